# asyncactions worker image. Mount or COPY your processors' code into /app and point
# ASYNCACTIONS_DATABASE_URL at PostgreSQL, e.g.:
#   docker run -e ASYNCACTIONS_DATABASE_URL=postgresql://app@db/app -v $PWD:/app \
#       asyncactions worker --import myapp.processors
# Extras (e.g. the dashboard's): docker build --build-arg EXTRAS=web -t asyncactions .
# Stop it with at least [worker] shutdown_grace (30s) plus a margin: docker stop -t 40.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY asyncactions ./asyncactions
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ARG EXTRAS=""
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# psycopg[binary] brings its own libpq: no system packages needed.
COPY --from=build /wheels /wheels
# The package is our own wheel (a path hadolint cannot see through the variable).
# hadolint ignore=DL3013
RUN wheel="$(echo /wheels/asyncactions-*.whl)" \
    && pip install "${wheel}${EXTRAS:+[$EXTRAS]}" \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 --user-group asyncactions \
    && mkdir /app && chown 10001:10001 /app
# Numeric, so Kubernetes' runAsNonRoot can check it is not root.
USER 10001:10001
WORKDIR /app
ENV PYTHONPATH=/app
# SIGTERM (docker stop) shuts the worker down gracefully; give it shutdown_grace.
STOPSIGNAL SIGTERM
ENTRYPOINT ["asyncactions"]
CMD ["worker"]
