"""One module per public op: argument checks, autograd, torch.library registration, dispatch."""
from ptkernels.ops.gpc_cell import gpc_cell
from ptkernels.ops.prefix_attention import prefix_attention

__all__ = ["prefix_attention", "gpc_cell"]
