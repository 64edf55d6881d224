"""``python -m vllm_kvcompress``: the main command (:mod:`vllm_kvcompress.serve_demo`)."""
import sys

from .serve_demo import main

sys.exit(main())
