"""The ``kdkit demo`` pipelines, one module per task: :mod:`.classification` (``kdkit demo``),
:mod:`.segmentation` (``--task segmentation``), :mod:`.detection` (``--task detection``) and :mod:`.style`
(``--style``, the patent's style-augmented distillation on either of the first two); :mod:`.common`
holds the cached demo teacher and the report frame they share."""
