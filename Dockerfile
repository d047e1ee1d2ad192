# The training image: CUDA PyTorch + this repository, run as a non-root user (uid 1000). The arguments are the
# scripts' own (the entrypoint is `python`):
#
#   docker build -t nanollm .
#   docker run --gpus all -v $PWD/data:/workspace/data -v $PWD/out:/workspace/out nanollm train.py config/a100_2day.py
#   docker run --gpus all -v ... nanollm grpo.py config/usmle.py --init_from=out/a100_2day/ckpt.pt
#   docker run --gpus all -v ... nanollm export_hf.py --ckpt out/usmle/ckpt.pt --out out/hf/usmle
#   docker run --gpus all --shm-size=16g -v ... --entrypoint torchrun nanollm --standalone --nproc_per_node=8 \
#       train.py config/a100_2day.py
#
# Mounted folders must be writable by uid 1000 (the Kubernetes jobs set fsGroup: 1000). k8s/ runs this image.
# Pick another PyTorch with --build-arg BASE_IMAGE=pytorch/pytorch:<version>-cuda<x.y>-cudnn9-runtime.
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# gcc + libc headers: torch.compile's Triton builds a small C launcher at run time; runtime images have no compiler
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
COPY requirements.txt .
# torch is already in the base image: pip keeps it when it satisfies requirements.txt; the check fails the build
# if pip replaced it with a CPU-only wheel (then choose a BASE_IMAGE whose torch matches requirements.txt)
RUN pip install --no-cache-dir -r requirements.txt \
 && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else \
    'requirements.txt replaced the CUDA torch of the base image')"

# GPT-2's BPE files baked in: pods tokenize without reaching openaipublic.blob.core.windows.net
ENV TIKTOKEN_CACHE_DIR=/opt/tiktoken
RUN python -c "import tiktoken; tiktoken.get_encoding('gpt2')" && chmod -R a+rX /opt/tiktoken

# uid/gid 1000; some base images already have such a user (Ubuntu 24.04's "ubuntu")
RUN id -u 1000 >/dev/null 2>&1 || useradd --create-home --uid 1000 --user-group app
COPY --chown=1000:1000 . .
RUN mkdir -p data out .cache && chown 1000:1000 /workspace data out .cache
USER 1000:1000
# unbuffered: kubectl logs shows each step as it happens
ENV PYTHONUNBUFFERED=1 HF_HOME=/workspace/.cache/huggingface

ENTRYPOINT ["python"]
CMD ["train.py", "config/debug.py"]
