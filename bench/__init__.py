"""Benchmarks of hiflow_fast, installed as `hiflow_fast.bench`; one module per subject
(`bench_<name>.py`, each with `main(argv) -> int`), run by `hiflow-fast bench <name>`."""
