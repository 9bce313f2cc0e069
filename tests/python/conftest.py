import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

# Tiny models: one thread each is fastest, and the tests share the machine with other jobs.
torch.set_num_threads(1)
