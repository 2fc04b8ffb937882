# autopipeline-grpc server image. Build:  docker build -t autopipeline-grpc .
# Run:    docker run --gpus all -p 50051:50051 autopipeline-grpc \
#           serve --model photoreal=dreamlike-art/dreamlike-photoreal-2.0 --dtype float16
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/var/cache/huggingface
# The torch wheel index decides the accelerator build: cu128 by default, "cpu" for CPU-only images.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

WORKDIR /app
# Dependencies first, so source edits do not reinstall torch.
COPY pyproject.toml README.md ./
COPY client/ client/
COPY server/ server/
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.4,<3" \
 && pip install ".[server]" \
 && useradd --create-home --uid 10001 autopipeline \
 && mkdir -p "$HF_HOME" && chown autopipeline "$HF_HOME"

USER autopipeline
EXPOSE 50051
# Models load before health turns SERVING; give large checkpoints time.
# Health needs no token. With TLS, override this in a derived image or compose file, adding
# --tls-ca (and --tls-cert/--tls-key for mutual TLS; --tls-server-name if the certificate
# does not name localhost).
HEALTHCHECK --interval=15s --timeout=6s --start-period=600s --retries=3 \
  CMD ["autopipeline-server", "health", "--target", "localhost:50051"]
# SIGTERM drains: in-flight requests get --grace seconds, new ones get UNAVAILABLE.
STOPSIGNAL SIGTERM
ENTRYPOINT ["autopipeline-server"]
CMD ["serve", "--config", "/etc/autopipeline/config.toml"]
