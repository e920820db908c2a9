"""The co-design flow: from an MoE model to expert images and a hardware config (planned)."""
