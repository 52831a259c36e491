"""File formats shared by several packages: the safe NVIDIA pickle reader/writer, URL sources with a
cache, atomic writes. This is a leaf package: it imports nothing else of ours."""
