"""Every question a loop asks a person through `interrupt()`: what the terminal, the UI and agents show.

Results a person picks from are numbered from 1, as listed, on every face and in every loop.
"""

GENIR_FEEDBACK_ASK = "What differs from the image you want? Or answer 'found: N' (its position as listed) or an id."
GENIR_EMPTY_FEEDBACK_ASK = "Empty feedback: describe what differs, or answer 'found: N'."
GENIR_CHATIR_ASK = "{question} Answer it, or say 'found: N' (its position as listed) or an id."
"""ChatIR feedback: the system's question about the image a person has in mind."""

RAGE_SELECT_ASK = (
    "Pick the images to generate with, in the order they should be used: positions as shown (1, 2, ...), ids "
    "(or unique prefixes) or file names. Pick nothing and give a new prompt to search again, or pick nothing to stop."
)
RAGE_REVIEW_ASK = "accept this image, regenerate it (optionally with a new prompt), or reselect the references"
