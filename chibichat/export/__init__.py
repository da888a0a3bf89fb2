"""Sharing models with Hugging Face transformers.

hf.py            chibichat checkpoint <-> NanoChat-format folder (weights, config, generation config)
hf_tokenizer.py  chibichat Tokenizer <-> HF `tokenizers` byte-level BPE (tokenizer.json) + chat template
card.py          the model card (README.md): metrics, training data and licences
importer.py      NanoChat folder / hub repo -> chibichat home (tokenizer + checkpoint)
remote_iberis.py self-contained transformers modeling file shipped with hybrid (SLC2) exports;
                 package data, never imported by chibichat itself

transformers, tokenizers and huggingface_hub are optional (`pip install chibichat[hf]`): they are
imported inside functions, and a missing one is a ChibiError naming the extra to install.
"""
