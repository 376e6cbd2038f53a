"""Started by Python in a process whose sys.path has tests/fake_cuda (tests/test_gpu_rehearsal.py
puts it on PYTHONPATH of the rehearsal's processes, the mapped-memory probe's child included):

* OMNIKV_FAKE_CUDA=<scenario>: install the fake torch.cuda (tests/fake_cuda/fake_cuda.py);
* OMNIKV_BLOCK_MODULES=a,b,c: make those top-level packages unimportable, as on the GPU image.

Nothing happens when neither is set."""

import os
import sys

_blocked = {m.strip() for m in os.environ.get("OMNIKV_BLOCK_MODULES", "").split(",") if m.strip()}
if _blocked:

    class _Blocker:
        """A meta path finder that answers 'not installed' for the blocked packages."""

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _blocked:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: not on the GPU image)", name=name)
            return None

    sys.meta_path.insert(0, _Blocker())

if os.environ.get("OMNIKV_FAKE_CUDA"):
    import fake_cuda

    fake_cuda.install(os.environ["OMNIKV_FAKE_CUDA"])
