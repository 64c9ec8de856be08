"""The masks: the gate and its compensated gradient (``gate``), the per-config mask node that
computes the soft masks of many layers at once (``group``), and which units a layer's input
carries (``units``). Functions over tensors and configs; no module state."""
