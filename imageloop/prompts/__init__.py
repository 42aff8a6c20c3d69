"""Every text we send to a model, as named templates with `{placeholders}`.

The ImageRAG critic follows the paper's order of questions: does the image match the prompt (content
and style)? which concepts are missing (short, general, at most k, few-shot constrained)? then one
stand-alone detailed retrieval caption per concept (detailed captions retrieve better than concept
words or the raw prompt).
"""

CRITIC_SYSTEM = "You are a meticulous visual critic for a text-to-image system. You answer only with JSON."

CRITIC_PROMPT = """\
The image was generated for the prompt: "{prompt}"

Does the image match the prompt? Consider both content and style, and ignore minor details.
If it does not match, list the concepts from the prompt that are missing or wrong in the image, at most \
{max_concepts}. A concept is short and general: an object, an animal species, a landmark, a style, an \
action; not a whole sentence and not a detail of the composition.

Example. Prompt: "a Cyanocitta cristata perched on a snowy branch, ukiyo-e style". The image shows a \
small brown bird on a snowy branch, photographed.
Answer: {{"aligned": false, "missing_concepts": ["Cyanocitta cristata", "ukiyo-e style"]}}

Example. Prompt: "a red bicycle leaning against a brick wall". The image shows exactly that.
Answer: {{"aligned": true, "missing_concepts": []}}

Answer with JSON: {{"aligned": true or false, "missing_concepts": [...]}}."""

PLAN_PROMPT = """\
A text-to-image model must draw: "{prompt}"

Which concepts in this prompt is the model likely not to know well enough to draw from text alone \
(rare objects, specific species or breeds, landmarks, named styles, unusual actions)? List at most \
{max_concepts}, each short and general. List none if the prompt is common.

Example. Prompt: "a Cyanocitta cristata perched on a snowy branch".
Answer: {{"missing_concepts": ["Cyanocitta cristata"]}}

Answer with JSON: {{"missing_concepts": [...]}}."""

PLAN_EVERY_CONCEPT_PROMPT = """\
A text-to-image model must draw: "{prompt}"

Which visual concepts does the model need to know to draw it: the objects that appear in the image, \
its style, and the like? List at most {max_concepts}, each short and general.

Example. Prompt: "An elephant standing on a ball".
Answer: {{"missing_concepts": ["elephant", "ball"]}}

Answer with JSON: {{"missing_concepts": [...]}}."""
"""Generation mode as the released code asks it: every concept the prompt needs, not only rare ones."""

# The paper's critic, in the released code's words (rotem-shalev/ImageRAG @ 16c9502, utils.py
# `retrieval_caption_generation`): one conversation, plain-text answers, the image on the first turn.

PAPER_CRITIC_DECISION = (
    'Does this image match the prompt "{prompt}"? consider both content and style aspects. only answer yes or no.'
)
"""utils.py l.68; an answer containing "yes" means aligned (l.71)."""

PAPER_CRITIC_CONCEPTS = (
    "What are the differences between this image and the required prompt? in your answer only provide missing "
    "concepts in terms of content and style, each in a separate line. For example, if the prompt is "
    '"An oil painting of a sheep and a car" and the image is a painting of a car but not an oil painting, the '
    "missing concepts will be:\noil painting style\na sheep"
)
"""utils.py l.87, asked after the decision in the same conversation."""

PAPER_PLAN_CONCEPTS = (
    'What visual concepts does a generative model need to know to generate an image described by the prompt "{prompt}"?'
    "\nThe concepts should be things like objects that should appear in the image, the style of it, etc. For example, "
    'if the prompt is "An elephant standing on a ball", 2 concepts would be: elephant, ball. In your answer only '
    "provide the concepts, each in a separate line."
)
"""utils.py l.96-100, generation mode (no image); the code's missing spaces between sentences are restored."""

PAPER_CONCEPT_LIMIT = "Return up to {max_concepts} concepts."
"""utils.py l.88-89, appended when a limit is set (the code glues it to the example; we start a new line)."""

PAPER_CRITIC_CAPTIONS = (
    "For each concept you suggested above, please suggest 1 image captions describing images that explain this "
    "concept only. The captions should be stand-alone description of the images, assuming no knowledge of the "
    "given images and prompt, that I can use to lookup images with automatically. In your answer only provide the "
    "image captions, each in a new line with nothing else other than the caption."
)
"""utils.py l.108-110 with k_captions_per_concept=1, as both released scripts call it."""

PAPER_REPHRASE_AFTER_DECISION = (
    "Please rephrase the following prompt to make it easier and clearer for the text-to-image generation model "
    "that generated the above image for this prompt. The goal is to generate an image that matches the given text "
    "prompt. If the prompt is already clear, return it as it is. Simplify and shorten long descriptions of known "
    "objects/entities but DO NOT change the original meaning of the text prompt. If the prompt contains rare words, "
    "change those words to a description of their meaning. In your answer only provide the prompt and nothing else. "
    'The prompt to be rephrased: "{prompt}"'
)
"""utils.py l.124, the rephrase-only ablation (`--only_rephrase`): asked after the decision, in its conversation."""

PAPER_REPHRASE = (
    "Please rephrase the following prompt to make it clearer for a text-to-image generation model. If it's already "
    "clear, return it as it is. In your answer only provide the prompt and nothing else, and don't change the "
    "original meaning of the prompt. If it contains rare words, change the words to a description of their meaning. "
    'The prompt to be rephrased: "{prompt}"'
)
"""utils.py l.122, the same without an image (generation mode, which the released scripts never rephrase in)."""

PAPER_RERANK = (
    "Which of these images is the most similar to the prompt {prompt}? in your answer only provide the indices of "
    "the {k} most relevant images with a comma between them with no spaces, starting from index 0, e.g. answer: 0,3 "
    "if the most similar images are the ones in indices 0 and 3. If you can't determine, return the first {k} "
    "indices, e.g. 0,1 if {k}=2."
)
"""retrieval.py l.197-199 (`gpt_rerank`, the paper's re-ranking ablation), the candidates attached in order; the
code's missing spaces between sentences are restored, its "if {k}=2" kept as written."""

CAPTIONS_PROMPT = """\
We will search an image collection for reference pictures that help draw: "{prompt}"

For each concept below, write one detailed caption of an image that shows the concept clearly, as a \
photo caption would describe it. Each caption stands alone: name the concept explicitly and do not \
refer to the prompt or to other captions.

Concepts: {concepts}

Example. Concept: "Cyanocitta cristata".
Caption: "A blue jay (Cyanocitta cristata) with a blue crest, white face and black collar, perched on \
a branch."

Answer with JSON: {{"captions": [{{"concept": "...", "caption": "..."}}, ...]}} with one entry per \
concept, in the same order."""

CAPTIONER_PROMPT = """\
Write one detailed caption of this image for a search index: the main subject named as precisely as \
you can (species, object type, landmark, style), then its appearance and setting. One or two \
sentences, no preamble."""

REPAIR_PROMPT = """\
Your answer could not be used: {error}
Answer again with only a JSON object that follows this schema: {schema}"""

# ImageRAG's in-context prompts, worded as the released code words them (rotem-shalev/ImageRAG @ 16c9502):
# imageRAG_OmniGen.py l.130-131 pairs each image with the retrieval caption that found it, in order; the
# paper's text says "these examples of", the code that produced its figures says "these images of".
# imageRAG_SDXL.py l.131 gives SDXL + IP-Adapter one image and names it by its caption, with no image word
# the text encoders could not resolve anyway.

IN_CONTEXT_TEMPLATE = "According to these images of {examples}, generate {prompt}"
"""Backends that read image placeholders in the text (OmniGen's tokens, gpt-image's "image i")."""

IN_CONTEXT_EXAMPLE = "{label}: {image}"
"""One reference in IN_CONTEXT_TEMPLATE: its retrieval caption, then its placeholder."""

ADAPTER_TEMPLATE_ONE = "According to this image of {label}, generate {prompt}"
"""Backends whose references enter beside the text (IP-Adapter, Redux), with one reference."""

ADAPTER_TEMPLATE_MANY = "According to these images of {labels}, generate {prompt}"
"""The same with several references (an option; the paper gives SDXL one)."""

VERBATIM_WITH_PLACEHOLDERS = "{prompt} {images}"
"""The user's prompt unchanged, followed by the placeholders a backend needs to see the images at all (OmniGen)."""


# GenIR: multi-round retrieval of the image a user has in mind, with generated images as feedback.
# The simulated user's "ours" style: one structured call per round.

SIMULATED_USER_DESCRIBE = """\
You are looking for this image in a large collection, but you can only describe it from memory. \
Write one short description (one sentence) of the image, as a person searching for it would type it.

Answer with JSON: {"differences": "", "query": "..."}."""

SIMULATED_USER_VISUAL = """\
The first image is the image you are looking for. The second image is what the search system drew \
from your last description: "{query}"

First compare the two images: state what is different (subjects, attributes, colours, layout, \
setting, style). Then write a new description of the FIRST image that fixes those differences. The \
new description stands alone: it does not mention the drawing, the previous description or the \
differences.

Answer with JSON: {{"differences": "...", "query": "..."}}."""

SIMULATED_USER_PREDICTION = """\
The first image is the image you are looking for. The second image is the best match the search \
system found for your last description: "{query}"

First compare the two images: state what is different. Then write a new description of the FIRST \
image that fixes those differences. The new description stands alone.

Answer with JSON: {{"differences": "...", "query": "..."}}."""

SIMULATED_USER_VERBAL = """\
This is the image you are looking for. Your last description was: "{query}"
The search system has not found it yet. State what your description leaves out or gets wrong, then \
write a new, more precise description of the image. The new description stands alone.

Answer with JSON: {{"differences": "...", "query": "..."}}."""

# GenIR's simulated user as the released code asks it (mikelmh025/generative_ir @ 58891a5): plain-text
# answers, a system turn naming the token budget, the target image on every turn. One script per kind
# of feedback: genIR_CaptionImageRefinement.py (visual, the paper's method),
# genIR_CaptionRefinment_VIsualPredictionFeedBack.py (prediction), genIR_CaptionRefinment_TextOnly.py (verbal).

GENIR_CAPTION_SYSTEM = (
    "You are an image captioning assistant that creates concise but detailed descriptions for use in "
    "text-to-image diffusion models. Keep your description under {max_tokens} tokens."
)
"""Round 0, visual and verbal: ImageRefinement l.289, TextOnly l.129."""

GENIR_CAPTION = (
    "Generate a detailed, descriptive caption of this image for use as a prompt in a diffusion model. Focus on "
    "visual elements, style, composition, colors, and details. Generate ONLY a detailed caption for this image. "
    "DO NOT include any introductory text or explanations. The output should be the raw caption text ready for a "
    "diffusion model."
)
"""Round 0, visual and verbal: ImageRefinement l.281-286, TextOnly l.121-126."""

GENIR_COMPARE_SYSTEM = (
    "You are an image analysis assistant that compares original images with their synthetically generated "
    "versions, highlighting important differences that need to be addressed in caption refinement. Keep your "
    "analysis under {max_tokens} tokens."
)
"""Visual feedback, first call: ImageRefinement l.386."""

GENIR_COMPARE = (
    "Here is the Original caption of the first image: {query}. Based on the caption someone drew the second "
    "image. Compare the content difference between the two images. Only tell me what's the difference. Concise "
    "and clear."
)
"""Visual feedback, first call (target, then the synthetic image): ImageRefinement l.380."""

GENIR_REFINE_SYSTEM = (
    "You are a caption refinement assistant. Your task is to refine image captions based on feedback about the "
    "differences between original images and images generated from captions. Keep your refined caption under "
    "{max_tokens} tokens."
)
"""Visual feedback, second call: ImageRefinement l.309-313."""

GENIR_REFINE = (
    "I need you to refine the following caption for this image. The caption was used to generate a synthetic "
    "version of this image, but the result didn't fully match. Here is the comparison feedback: "
    "\n\n{differences}\n\nPrevious caption: '{query}'\n\nPlease provide an improved caption that would help "
    "generate an image more similar to the original. Focus on correcting the issues identified in the comparison. "
    "Generate ONLY the refined caption, without any explanations or surrounding text."
)
"""Visual feedback, second call (the target only): ImageRefinement l.298-306."""

GENIR_PREDICTION_CAPTION_SYSTEM = (
    "You are an image captioning assistant that creates concise but detailed descriptions for distinguishing "
    "images in retrieval tasks. Keep your description under {max_tokens} tokens."
)
"""Round 0, prediction feedback: VIsualPredictionFeedBack l.291."""

GENIR_PREDICTION_CAPTION = (
    "Generate a detailed, descriptive caption of this image for use in image retrieval. Focus on distinctive "
    "visual elements, style, composition, colors, and details that would help identify this specific image from "
    "a large collection. Generate ONLY a detailed caption for this image. DO NOT include any introductory text "
    "or explanations."
)
"""Round 0, prediction feedback: VIsualPredictionFeedBack l.283-288."""

GENIR_PREDICTION_COMPARE_SYSTEM = (
    "You are an image analysis assistant that compares images to help improve text queries for image retrieval "
    "systems. Keep your analysis under {max_tokens} tokens."
)
"""Prediction feedback, first call: VIsualPredictionFeedBack l.444."""

GENIR_PREDICTION_COMPARE = (
    'Here is my text query for retrieving the first image: "{query}". But my retrieval system returned the second '
    "image instead. Compare the content differences between these two images. Only tell me what's different and "
    "what specific details I should add or modify in my query to better retrieve the target image. Be concise and "
    "clear."
)
"""Prediction feedback, first call (target, then the top retrieved image): VIsualPredictionFeedBack l.435-440."""

GENIR_PREDICTION_REFINE_SYSTEM = (
    "You are an image retrieval expert. Your task is to refine textual queries to better match target images in "
    "retrieval systems. Keep your refined query under {max_tokens} tokens."
)
"""Prediction feedback, second call: VIsualPredictionFeedBack l.311-313."""

GENIR_PREDICTION_REFINE = (
    "I'm trying to create a textual query that will accurately retrieve this target image from a large "
    'collection. My current query is: "{query}"\n\nWhen I used this query for image retrieval, I got a result '
    "that ranked at position {rank}. Please analyze both images - the target image and the retrieved result. "
    "Refine my query to better match the target image and distinguish it from similar images in the collection. "
    "Focus on unique aspects of the target image that weren't captured in my initial query. Generate ONLY the "
    "refined query text, without any explanations or surrounding text."
)
"""Prediction feedback, second call (target, then the top retrieved image): VIsualPredictionFeedBack l.300-307.
The code refines from the images and the rank alone; the first call's comparison is recorded, not passed on."""

GENIR_CRITIQUE_SYSTEM = (
    "You are a {role_lower} in an iterative caption refinement process. Your goal is to help improve image "
    "captions by identifying issues and suggesting improvements."
)
"""Verbal feedback, first call: TextOnly l.199."""

GENIR_CRITIQUE = (
    "You are playing the role of a '{role}' in a caption refinement process. Review this caption: \"{query}\". "
    "Provide specific feedback on how to improve it. Focus on accuracy, detail, clarity, and usefulness for a "
    "text-to-image system. Keep your critique under {max_tokens} tokens. Provide ONLY the critique with "
    "constructive feedback."
)
"""Verbal feedback, first call (the target): TextOnly l.196."""

GENIR_VERBAL_REFINE_SYSTEM = (
    "You are a caption refinement assistant. Your task is to improve image captions based on critique feedback."
)
"""Verbal feedback, second call: TextOnly l.266."""

GENIR_VERBAL_REFINE = (
    'Based on this critique: "{differences}", refine the following caption: "{query}". Create an improved '
    "version that addresses the issues while staying true to the image content. Provide ONLY the refined caption "
    "with no explanations or surrounding text. Keep your response under {max_tokens} tokens."
)
"""Verbal feedback, second call (the target): TextOnly l.263."""

# ChatIR (Levy et al., NeurIPS 2023), the baseline GenIR compares with: a model asks about the image, the
# person searching answers, and the whole dialogue is the query. ChatIR's dialogues (GenIR's ChatIR/dialogues/,
# e.g. ChatGPT_BLIP2.json) open with a caption and hold one "question? answer" line per round; its
# evaluation joins them with ", " (ChatIR/eval.py l.51, l.207). Neither repository ships the questioner's
# prompt, so the wording below is ours.

CHATIR_QUESTION = """\
You are helping someone find a picture in a large image collection. You cannot see the picture; they can. \
This is what they told you so far: their description first, then each question asked and their answer.

{dialogue}

Ask one new, short question about the picture whose answer would best tell it apart from similar pictures \
(objects, colours, people, setting, layout). Do not ask what is already answered. Answer with the question only."""

CHATIR_ANSWER = (
    "This is the picture you are looking for. Answer this question about it in a few words, as a person "
    "would, with nothing else: {question}"
)
"""The simulated user answers a ChatIR question about its target (ChatIR's answerer was BLIP-2, in a few words)."""

QUERY_REFINER_PROMPT = """\
A person is searching an image collection for a picture they remember. Their last search was: \
"{query}"
{shown}They said: "{feedback}"

Write the next search description: one stand-alone description of the picture they want, keeping \
what was right and fixing what they said. Do not refer to earlier searches.

Answer with JSON: {{"query": "..."}}."""

QUERY_REFINER_SHOWN = "The image attached is what the system drew from that search.\n"

JSON_SCHEMA_NOTE = "Answer with only a JSON object that follows this JSON schema: {schema}"
"""Added to the system turn by backends that cannot constrain decoding to a schema (local transformers VLMs)."""

# ImageRAG evaluation: the VLM judge (`imageloop eval imagerag --metrics vlmscore`).

JUDGE_PROMPT = (
    'How well does this image match the prompt "{prompt}"? Consider both content and style: every object, '
    "species, landmark or style the prompt names must be shown correctly. Rate the match from 0 (unrelated) "
    "to 100 (a perfect match). Answer with the number only."
)
"""A 0-100 alignment rating read as a fraction, as GPTScore-style judges are asked. The wording is ours:
ImageRAG's evaluation prompt was not available to check it against."""
