"""The tools built on the flashcomm library, not needed to serve: the reference decoder
and reference numerics, the rank pools the tests and benchmarks run on, the demos, the
benchmark and tuning measurements (``flashcomm demo|bench|tune``) and the vLLM engine
runner of the tests.

Nothing in the library (``flashcomm``, ``flashcomm.vllm``) imports this package.
"""
