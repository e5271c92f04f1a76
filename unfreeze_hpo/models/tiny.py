"""Small pytorchvideo architectures (``pytorchvideo:mvit_tiny``, ``pytorchvideo:resnet3d_tiny``)
built from pytorchvideo's own parts: they train on a CPU in seconds; kwargs override defaults."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def mvit_tiny(**overrides: Any) -> nn.Module:
    """A 4-block MViT from pytorchvideo's builder for 4x32x32 clips: trains on a CPU."""
    from pytorchvideo.models.vision_transformers import create_multiscale_vision_transformers

    config: dict[str, Any] = {
        "spatial_size": 32,
        "temporal_size": 4,
        "depth": 4,
        "patch_embed_dim": 32,
        "conv_patch_embed_kernel": (3, 4, 4),
        "conv_patch_embed_stride": (2, 4, 4),
        "conv_patch_embed_padding": (1, 0, 0),
        "embed_dim_mul": [[1, 2.0], [3, 2.0]],
        "atten_head_mul": [[1, 2.0], [3, 2.0]],
        "pool_q_stride_size": [[1, 1, 2, 2], [3, 1, 2, 2]],
        "pool_kv_stride_adaptive": [1, 2, 2],
        "pool_kvq_kernel": [3, 3, 3],
        "head_dropout_rate": 0.0,
        "head_num_classes": 400,
    }
    config.update(overrides)
    return create_multiscale_vision_transformers(**config)


def resnet3d_tiny(
    *,
    input_channel: int = 3,
    stem_dim_out: int = 8,
    stage_depths: tuple[int, ...] = (1, 1, 1, 1),
    model_num_class: int = 400,
    dropout_rate: float = 0.0,
) -> nn.Module:
    """A shallow, narrow ResNet3D (stem + one bottleneck per stage) from pytorchvideo's parts.

    Temporal convolutions run from the stem on (as in I3D), so motion of a few pixels per frame
    is seen before spatial downsampling hides it.
    """
    from pytorchvideo.models.head import create_res_basic_head
    from pytorchvideo.models.net import Net
    from pytorchvideo.models.resnet import create_bottleneck_block, create_res_stage
    from pytorchvideo.models.stem import create_res_basic_stem

    blocks: list[nn.Module] = [
        create_res_basic_stem(
            in_channels=input_channel,
            out_channels=stem_dim_out,
            conv_kernel_size=(3, 7, 7),
            conv_padding=(1, 3, 3),
        )
    ]
    dim_in, dim_out = stem_dim_out, stem_dim_out * 4
    for i, depth in enumerate(stage_depths):
        temporal_kernel = 3
        blocks.append(
            create_res_stage(
                depth=depth,
                dim_in=dim_in,
                dim_inner=dim_out // 4,
                dim_out=dim_out,
                bottleneck=create_bottleneck_block,
                conv_a_kernel_size=(temporal_kernel, 1, 1),
                conv_a_stride=(1, 1, 1),
                conv_a_padding=(temporal_kernel // 2, 0, 0),
                conv_b_stride=(1, 1 if i == 0 else 2, 1 if i == 0 else 2),
            )
        )
        dim_in, dim_out = dim_out, dim_out * 2
    blocks.append(
        create_res_basic_head(
            in_features=dim_in,
            out_features=model_num_class,
            pool=nn.AdaptiveAvgPool3d,
            output_size=(1, 1, 1),
            dropout_rate=dropout_rate,
        )
    )
    return Net(blocks=nn.ModuleList(blocks))


SMALL: dict[str, Callable[..., nn.Module]] = {
    "mvit_tiny": mvit_tiny,
    "resnet3d_tiny": resnet3d_tiny,
}
