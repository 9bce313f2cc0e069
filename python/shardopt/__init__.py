"""shardopt: a sharded optimizer (ZeRO stages 1-3 with owner-rank Muon) for PyTorch and C++ trainers.

``shardopt.torch.ShardedOptimizer`` is the torch.optim.Optimizer to use from PyTorch; ``shardopt._C``
holds the compiled engine it drives.
"""
from . import _C  # noqa: F401
from ._C import Error  # noqa: F401

__version__ = "0.1.0"
