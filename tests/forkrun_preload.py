"""What tests/forkrun.py's fork server imports once, so that no rank forked from it pays for it.

Measured in a forked rank of each program (tests/forkrun.py, ``FORKRUN_IMPORTS``): beyond the
programs' own imports, a rank loads torch._dynamo (with sympy and triton, ~3 s of CPU: torch's
optimizers import it on first construction), matplotlib with the Agg backend, PIL's image plugins,
and torch.distributed.checkpoint (with torch.distributed.elastic) where it saves or resumes.
"""

import os

# Before any OpenMP runtime loads (torch's, scikit-learn's): it reads its thread count once, here,
# not in the forked rank. One thread, as torchrun and tests/launch.py give every worker; the
# programs then set torch's own count (common/dist.py). Left at the core count, scikit-learn's
# models in 2 ranks and 2 pytest workers spin on 2 cores: compare.py took 20 s instead of 3.
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402
import torch._dynamo  # noqa: F401,E402
import torch.distributed  # noqa: F401
import torch.distributed.checkpoint.state_dict  # noqa: F401 - common/ imports it where it saves or resumes
import torch.distributed.fsdp  # noqa: F401
import torchvision  # noqa: F401
from PIL import JpegImagePlugin, PngImagePlugin  # noqa: F401

import anomaly.train  # noqa: F401
import cifar.train  # noqa: F401
import housing.train  # noqa: F401
from common.figures import pyplot

pyplot()  # matplotlib on Agg, as the programs select it
