"""The indexes a table root can have: name -> the vector column it indexes."""

INDEX_COLUMNS = {"image": "image_embedding", "text": "text_embedding"}
