# The services' image (compose.yaml). llama-server itself runs in the official llama.cpp
# images, started by the agent.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml ./
COPY proto proto
COPY lls lls
COPY services services
RUN pip install --no-cache-dir .
