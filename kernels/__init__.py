"""Fused kernels of the engine: each module holds the PyTorch reference, the Triton kernel,
its autograd wrapper and the public function that dispatches between them."""
