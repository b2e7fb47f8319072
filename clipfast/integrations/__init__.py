"""One-line adoption in the training stacks users already run.

* ``clipfast.integrations.open_clip``: ``patch()`` / ``unpatch()`` /
  ``patched()`` swap open_clip's loss classes (and ``create_loss``) for
  clipfast's drop-ins;
* ``clipfast.integrations.transformers``: ``model_loss(model, **batch)`` and
  ``patch(model)`` for Hugging Face ``CLIPModel`` / ``SiglipModel`` /
  ``Siglip2Model``;
* ``clipfast.integrations.sentence_transformers``: the
  MultipleNegativesRankingLoss family as O(N)-memory classes.

Each submodule imports its client when it is imported itself: ``import
clipfast`` (and ``import clipfast.integrations``) never imports open_clip,
transformers or sentence-transformers.
"""
