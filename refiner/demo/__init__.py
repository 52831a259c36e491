"""The built-in demo (`refiner demo`, what `make demo` runs): the whole mission on real images, offline, on
a laptop CPU in minutes. Kept apart from the core (config → losses, σ, EMA → loop → jobs → CLI):

- `assets`: the committed assets (assets/demo/: a small EDM teacher, an under-trained StyleGAN2, a
  Fashion-MNIST classifier, reference statistics, the teacher's samples) and the demo generator's format;
- `runner`: measure, refine or distil, measure again, write the report (`run_demo`);
- `build`: how the assets were made (their trainers and a StyleGAN2 discriminator; scripts/build_demo_assets.py);
- `fashion_mnist`: the Fashion-MNIST IDX reader, lookup and checked download.
"""
