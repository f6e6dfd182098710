"""Suite-wide settings.

Tests use tiny models, for which intra-op threads cost more in synchronisation than they gain
(a tiny training step measured 0.036 s on 1 thread against 0.49 s on 2 threads of a busy 2-core
machine), so every test runs torch on one thread. Benchmarks choose their own thread counts.
"""

import torch

torch.set_num_threads(1)

from tests.vllm_server import vllm_server  # noqa: E402, F401  (the session's one vLLM server, for every test that asks)
