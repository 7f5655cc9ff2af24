"""Test harnesses shared by the test modules (tiny models, Hugging Face references, CUDA source checks).

Test modules import these instead of each other, so each module runs alone and no module's
fixtures or parametrization leak into another.
"""
