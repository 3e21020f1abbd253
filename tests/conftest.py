"""Test-session settings shared by every test module."""

import torch

# The suite runs on small CPU machines shared with other jobs: one intra-op thread per process
# avoids OpenMP oversubscription, which makes small tensor ops tens of times slower under load.
torch.set_num_threads(1)
