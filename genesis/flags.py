"""Constants shared by the masker (genesis/masking/) and its Triton kernel (kernels/mask.py).

Token flag bits of the per-vocabulary `token_flags` table (built in `genesis.masking.MaskTables`), and the label
value that marks "no target" in the masker's int64 outputs, as `F.cross_entropy` expects it."""

GLUE_LEFT = 1  # the token continues the previous token's word (no leading space or boundary)
WORD_END = 2  # the token can end a word: the next token may start a new one
CLAUSE_BOUNDARY = 4  # punctuation that ends a clause
VERSE_SEPARATOR = 8  # the token that joins verses in the stream
IGNORE_INDEX = -100
