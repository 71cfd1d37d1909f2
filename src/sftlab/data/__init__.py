"""The data half: source -> records -> examples, in the order the data travels.

    sources.py   read records (plain dicts) from files, folders, datasets, frames, lists, in chunks
    jsonstream.py  a .json document parsed value by value, so its records stream like JSON lines
    fields.py    rename a source's fields to sftlab's; Alpaca records to prompt/completion or chat
    formats.py   detect each record's format and validate it, naming the record and field
    chat.py      render conversations with a chat template; find what each assistant turn writes
    examples.py  tokenize records into aligned input_ids / targets (shifted once, here)
    preference.py  preference records -> Pairs (prompt, chosen, rejected), through examples.py's rules
    container.py the Examples those become (flat numpy arrays) and IGNORE; numpy only, for the later stages
    workers.py   one pass over the chunks (validate, tokenize, append), here or in spawned workers
    store.py     the cache entry on disk: arrays appended as they are made, read back memory-mapped
    prepare.py   the whole journey for one source, with statistics and the cache key
    mixture.py   several prepared sources drawn by weight / max_samples / epochs from the seed
    splits.py    the config-facing entry: train_data / eval_data with the config's settings

Nothing here imports the training loop; the loop receives Examples and knows no file format.
"""
