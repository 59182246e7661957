# Every target creates (or reuses) .venv at the repo root from nothing but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean server worker deploy alerts ui-shot

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/modalkit demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check modalkit tests
	$(BIN)/mypy modalkit

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py

# The Prefect way (README, "Run it the Prefect way"): a server with the UI, a process worker, the deployments of
# prefect.yaml. Each runs in its own terminal (server and worker stay up) and says what to do next. PREFECT_API_URL
# and PREFECT_HOME may be set to point them elsewhere. The server streams runs' logs out, so that `prefect deployment
# run ... --watch` prints them (a failed run's reason among them); Prefect's default is not to.
PREFECT_API_URL ?= http://127.0.0.1:4200/api
PREFECT_HOME ?= $(CURDIR)/.prefect
POOL ?= modalkit
PREFECT := PREFECT_HOME=$(PREFECT_HOME) PREFECT_API_URL=$(PREFECT_API_URL) PREFECT_SERVER_ANALYTICS_ENABLED=false \
	$(BIN)/prefect

server: $(STAMP)
	@echo "Prefect server and UI: http://127.0.0.1:4200 (data in $(PREFECT_HOME)). Next, in another terminal: make worker"
	@PREFECT_HOME=$(PREFECT_HOME) PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_API_URL=$(PREFECT_API_URL) \
		PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=true PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED=true \
		$(BIN)/prefect server start --host 127.0.0.1 --port 4200

worker: $(STAMP)
	@$(PREFECT) work-pool inspect $(POOL) >/dev/null 2>&1 || $(PREFECT) work-pool create $(POOL) --type process
	@echo "A process worker on pool $(POOL), talking to $(PREFECT_API_URL). Next, in another terminal: make deploy"
	@$(PREFECT) worker start --pool $(POOL) --type process

deploy: $(STAMP)
	@$(PREFECT) --no-prompt deploy --all
	@echo "A first run, on sample reviews (demo-output/prefect/):"
	@$(PREFECT) deployment run 'batch-inference/adhoc' --params "$$($(BIN)/python -m modalkit.demo demo-output/prefect)"
	@echo "Watch it at http://127.0.0.1:4200/runs; run your own with"
	@echo "  PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect deployment run 'batch-inference/adhoc' \\"
	@echo "      --param input_uri=... --param output_uri=... --watch"

# Prefect automations that notify on a failed job or one with failed records (automations/modalkit-alerts.yaml).
alerts: $(STAMP)
	@test -n "$(SLACK_WEBHOOK_URL)" || { echo "usage: make alerts SLACK_WEBHOOK_URL=https://hooks.slack.com/services/..."; exit 2; }
	@PREFECT_HOME=$(PREFECT_HOME) PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/python scripts/create_alerts.py \
		--slack-webhook-url "$(SLACK_WEBHOOK_URL)"

# A headless Chromium screenshot of a flow run's page in the Prefect UI, artifacts shown (docs/ui-shot.png).
ui-shot: $(STAMP)
	$(BIN)/python scripts/ui_shot.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .modalkit
