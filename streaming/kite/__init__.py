"""Everything that speaks Kite Connect: limits, instrument facts, tick codec, ticker client, REST."""
