"""How omnikv plugs into Hugging Face transformers: the version-sensitive names (`compat`), the
attention function with its one-shot hand-off and its mask helpers, the managed cache and its
dense / sliding layers, growable KV buffers, and static-shape decode steps (`static`: the run's
one owner, and the decoder for torch.compile / CUDA graphs). Nothing here knows about OmniKV's
selection or the Context Bank."""
