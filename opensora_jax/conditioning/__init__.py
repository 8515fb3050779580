"""Conditioning a generation on text syntax and on reference frames.

`prompts`: the prompt syntax (trailing JSON options, loop prompts); `masks`: mask strategies, frame copies and
loop bookkeeping; `references`: reading reference images and videos at the target size.
"""
