"""OmniKV inside vLLM: an attention backend plugin for dense models (see docs/vllm.md).

Installed into its own venv by integrations/vllm/setup.sh. vLLM loads `omnikv_vllm.plugin:register`
in every process through the `vllm.general_plugins` entry point; it does nothing unless
`OMNIKV_VLLM=1` is set (see `omnikv_vllm.settings`), so installing the plugin changes no other
vLLM run.
"""

__version__ = "0.1.0"
