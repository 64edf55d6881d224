"""Build script.

``KVC_BUILD_CUDA=1`` also builds the optional CUDA compaction kernel in ``csrc/``
(``vllm_kvcompress._C``, a benchmark alternative to the Triton one); without it the package is
pure Python.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("KVC_BUILD_CUDA") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules.append(
        CUDAExtension(
            "vllm_kvcompress._C",
            ["csrc/compaction.cu", "csrc/bindings.cpp"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-gencode=arch=compute_90,code=sm_90"]},
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(
    packages=[
        "vllm_kvcompress",
        "vllm_kvcompress.policies",
        "vllm_kvcompress.reference",
        "vllm_kvcompress.tools",
        "vllm_kvcompress.paged",
        "vllm_kvcompress.triton_kernels",
        "vllm_kvcompress.vllm",
        "vllm_kvcompress.vllm.frontend",
        "vllm_kvcompress.vllm.scheduler",
        "vllm_kvcompress.vllm.worker",
        "vllm_kvcompress.vllm.attention",
    ],
    # calibrated HeadKV head scores (python -m vllm_kvcompress.tools.calibrate) ship with the package
    package_data={"vllm_kvcompress": ["data/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
