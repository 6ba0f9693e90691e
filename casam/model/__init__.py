"""The networks: the frozen SAM backbone and decoder, the Alignment Layer, the VAE router and the refinement head."""

from __future__ import annotations

from casam.model.alignment import (
    AlignmentLayer,
    CAResBlock,
    ChannelAttention,
    LayerNorm2d,
    alignment_macs,
    count_parameters,
    describe,
    fresh_layer,
)
from casam.model.backbone import Backbone, file_sha256, fuse_conv_bn, litemedsam_checkpoint, load_backbone
from casam.model.decoder import DecoderContext, decode_with_context, decoder_context
from casam.model.head import RefineHead, corrective_clicks, image_tensor, keep_click_edits, refine, split_head_state
from casam.model.preprocess import (
    Geometry,
    apply_window,
    as_rgb,
    box_to_model,
    geometry_for,
    logits_to_image,
    mask_to_model,
    points_to_model,
    to_model_input,
)
from casam.model.router import FeatureVAE, Route, Router, calibrate_tau, pool_embedding, train_vae
