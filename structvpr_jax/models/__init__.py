"""Flax models: MobileNetV2 backbones, NetVLAD, branches."""
