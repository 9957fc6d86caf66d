# asyncactions worker image. Mount or COPY your processors' code into /app and point
# ASYNCACTIONS_DATABASE_URL at PostgreSQL, e.g.:
#   docker run -e ASYNCACTIONS_DATABASE_URL=postgresql://app@db/app -v $PWD:/app \
#       asyncactions worker --import myapp.processors
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY asyncactions ./asyncactions
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# psycopg[binary] brings its own libpq: no system packages needed.
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 --user-group asyncactions \
    && mkdir /app && chown asyncactions:asyncactions /app
USER asyncactions
WORKDIR /app
ENV PYTHONPATH=/app
# SIGTERM (docker stop) shuts the worker down gracefully; give it shutdown_grace.
STOPSIGNAL SIGTERM
ENTRYPOINT ["asyncactions"]
CMD ["worker"]
