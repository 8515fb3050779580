"""Text conditioning: caption cleaning and score suffixes (`captions`), tokenizers (`tokenizer`) and the text
encoders (`t5`)."""
