"""``refsd fp16-fix``: the search for the smallest fp16 fix (``search``) and the recipe file (``recipe``)."""
