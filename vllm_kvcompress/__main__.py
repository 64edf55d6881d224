"""``python -m vllm_kvcompress``: the main command (:mod:`vllm_kvcompress.tools.serve_demo`)."""
import sys

from vllm_kvcompress.tools.serve_demo import main

sys.exit(main())
