"""Shared settings of the detector tests."""

# few proposals and sampled RoIs: the RoI head's 12.8M-weight MLP runs once per RoI
RCNN_SMALL = {
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 40,
    "rpn_pre_nms_top_n_test": 200,
    "rpn_post_nms_top_n_test": 40,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 32,
}
