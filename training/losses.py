"""Every training loss as a pure function of tensors, formula in the docstring.

Read top to bottom: language modelling, preference (DPO family), reward modelling, then
policy-gradient losses (PPO / GRPO family). No module state, no models: tensors in, tensors out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---- language modelling / preference / reward losses (owner: post-training I) ------------------

# ---- policy-gradient losses: PPO, GRPO family (owner: post-training II) ------------------------
