# make demo: the offline end-to-end LRC-BERT demo (9 to 14 minutes on 2 CPU cores; at most 15).
# make test: the test suite, as CI runs it.
.PHONY: demo test

demo:
	bash scripts/demo.sh

test:
	pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q tests
