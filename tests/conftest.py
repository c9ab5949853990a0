import os

# One intra-op thread everywhere: on 2-core boxes two threads make small ops ~100x slower,
# and the thread count is part of the determinism settings.
os.environ.setdefault("OMP_NUM_THREADS", "1")
