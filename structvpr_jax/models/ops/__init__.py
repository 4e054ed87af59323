"""How MobileNetV2's layers run: the op implementations behind `models/mobilenet.py`.

`mobilenet.py` says what the network is (the block tables, ConvBN,
InvertedResidual, MobileNetV2, the backbone registry); this package says how
its convolutions are computed on each backend:

  dispatch.py   THE rule: which implementation runs (`resolve_depthwise`:
                "auto" -> native / shifted / grouped; `folded_native`,
                `blocks_fuse`; when the native kernels take a call at all,
                `native_applies`; the joint expand+depthwise backward's
                width threshold). Everything below asks it; nothing else decides.
  pointwise.py  relu6 (PyTorch's derivative) and the 1x1 convolution as a
                matmul with a custom VJP (the kernel gradient's layout).
  depthwise.py  the 3x3 depthwise convolution three ways: "shifted" (9 shifted
                multiply-adds in XLA, custom VJP), "grouped" (one grouped
                conv: cuDNN / TPU), "native" (C++ kernels through XLA FFI,
                custom VJP; also with a fused bias, relu6 and the previous
                layer's bias + relu6 as a prologue); `DEPTHWISE_CONV`.
  conv.py       the full 3x3 convolution (the stem): XLA's, and the native
                forward + kernel gradient with a fused bias and relu6.
  fused.py      the inverted-residual block with folded frozen BatchNorm:
                as separate layers (what training differentiates), with the
                expand 1x1 + depthwise backward as one native pass on wide
                rows, and as one native forward pass (`fused_inverted_residual`).

The C++ kernels themselves, their build and their FFI bindings are
`models/native/`. Every implementation gives the same parameters and equal
values (up to float rounding where the summation order differs).
"""
