"""The offline reading app: one self-contained HTML file per reader (``page``) and the coordinator's merge (``merge``).

``app.html``, ``app.js`` and ``app.css`` beside this file are package data: the page is built by
filling that template, so the app's code can be read and reviewed as ordinary HTML/JS/CSS.
"""
