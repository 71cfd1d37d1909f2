"""The data half: source -> records -> examples, in the order the data travels.

    sources.py   load records (plain dicts) from files, folders, datasets, frames, lists
    formats.py   detect each record's format and validate it, naming the record and field
    chat.py      render conversations with a chat template; find what each assistant turn writes
    examples.py  tokenize records into aligned input_ids / targets (shifted once, here)
    prepare.py   the whole journey with statistics, and the on-disk cache of prepared examples
    splits.py    the config-facing entry: train_data / eval_data with the config's settings

Nothing here imports the training loop; the loop receives Examples and knows no file format.
"""
