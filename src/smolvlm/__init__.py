"""smolvlm: build, train, evaluate, compress and serve small vision-language models on a CPU."""

__version__ = "0.1.0"
