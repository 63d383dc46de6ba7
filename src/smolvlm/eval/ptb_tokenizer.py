"""The tokenization step of the COCO caption evaluation (pycocoevalcap), in pure Python.

pycocoevalcap's ``PTBTokenizer.tokenize`` joins every caption of one side (all references, or all
candidates) into one text, one caption per line, runs the Java Stanford ``PTBTokenizer`` of CoreNLP
3.4.1 on it with ``-preserveLines -lowerCase``, then drops the tokens in :data:`PUNCTUATIONS`.
This module reproduces that pipeline without Java: :func:`tokenize_captions` is the whole step and
:func:`ptb_tokens` the Java tokenizer alone (lower-cased tokens of one line).

The lexer follows the rules of Stanford's ``PTBLexer`` (longest match wins, the earlier rule on
ties, trailing context counted in the match length) with the options the COCO scorer runs it with:
PTB3 escaping (``(`` -> ``-LRB-``, ``[`` -> ``-LSB-``, ``{`` -> ``-LCB-``, ``"`` -> ````/``''``,
dashes -> ``--``, ellipses -> ``...``, ``&amp;`` -> ``&``, ``¢`` -> ``cents``, ``½`` -> ``1/2``),
no americanization, no escaping of ``/`` and ``*``, split assimilations (``cannot`` -> ``can not``,
``gonna`` -> ``gon na``), unknown characters deleted. The main rules that decide COCO scores:

* contractions and possessives split off the word: ``don't`` -> ``do n't``, ``dog's`` -> ``dog 's``,
  ``dogs'`` -> ``dogs '``; words with an inner apostrophe stay whole (``o'clock``, ``ma'am``);
* hyphenated words, numbers with ``,``/``.``/``:`` inside (``1,000.50``, ``5:30``), dates, URLs,
  e-mail addresses, ``@names`` and ``#tags`` stay one token;
* a final period is split off (``dog.`` -> ``dog .``) except after known abbreviations and acronyms
  (``mr.``, ``st.``, ``u.s.``, a single letter ``a.``); an abbreviation that ends a sentence keeps
  its period and adds a ``.`` token (``etc. .``), an acronym before words like ``The`` likewise;
* parentheses become ``-lrb-``/``-rrb-`` after lower-casing, so pycocoevalcap's punctuation list
  (which holds ``-LRB-``) does **not** remove them, nor ``-lsb-``/``-rsb-``, ``?!``, ``#``, ``&``.

Because the captions are lexed as one text, a caption's last token may depend on the first
character of the next caption (e.g. ``etc.`` before an upper-case letter); :func:`tokenize_captions`
keeps that context by lexing the joined text, exactly like the Java run.

Checked against the Java run (pycocoevalcap's jar): every BMP character alone, between letters and
at the end of a line gives the same tokens; so do 50,000 generated captions mixing contractions,
abbreviations, numbers, URLs, quotes, brackets and Unicode punctuation (see docs/eval.md). Known
differences, all outside normal caption text: a caption containing a line break other than ``\\n``
(``\\r``, U+2028, U+2029, U+000B, U+000C) makes the Java tokenizer emit extra lines, which
shifts every later caption onto the wrong image in pycocoevalcap; here those characters are spaces
instead. Soft hyphens and combining marks glued to numbers or contractions (U+00AD before a number, ``won'té``)
can split differently. Characters outside the BMP (emoji) are deleted on both sides.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["PUNCTUATIONS", "ptb_tokens", "tokenize_captions", "tokenize_caption"]

#: The tokens pycocoevalcap removes after the Java tokenizer (compared with the lower-cased tokens,
#: so ``-LRB-`` never matches ``-lrb-``).
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"])

# ---------------------------------------------------------------------------------------------
# Character classes and macros (Python regex syntax). JFlex's %caseless applies to literal text but
# not to character classes; literals are written inside (?i:...) for that reason.
# ---------------------------------------------------------------------------------------------
def _numeric_class() -> str:
    """The BMP characters Python's regex \\w accepts that are neither letters nor decimal digits
    (½, ², Roman numerals...): the PTB lexer does not treat them as letters."""
    import unicodedata

    bad = [c for c in range(0x80, 0x10000) if chr(c).isalnum() and unicodedata.category(chr(c))[0] not in "LM"
           and not chr(c).isdecimal()]
    spans, start, prev = [], None, None
    for c in bad:
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            spans.append((start, prev))
            start = prev = c
    if start is not None:
        spans.append((start, prev))
    return "".join(f"\\u{a:04X}" if a == b else f"\\u{a:04X}-\\u{b:04X}" for a, b in spans)


_NOT_LETTER = _numeric_class()
_UPPER = "".join(sorted({c for c in map(chr, range(0x10000)) if c.isupper() and not c.islower()} - set("\\]^-")))
# The lexer's character classes were compiled from the Unicode tables of 2014; Python's are newer. These
# differences were measured by running the official Java tokenizer on every BMP character alone ("x C y")
# and between letters ("xCy"): characters it joins into words although Python does not call them letters
# (combining marks of Indic scripts, modifier symbols...), letters and digits it does not know (added to
# Unicode later: it deletes them), and symbols it keeps as one-character tokens.
_JAVA_EXTRA_LETTERS = (
    "\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02EB\u02ED\u02EF-\u02FF\u0375\u0378-\u0379\u0384-\u0385\u03F6"
    "\u0483-\u0487\u055A-\u055F\u0591-\u05BD\u05BF\u05C1-\u05C2\u05C4-\u05C5\u05C7\u0615-\u061A"
    "\u064B-\u065E\u0670\u06D6-\u06E4\u06E7-\u06ED\u06FD-\u06FE\u070F\u0711\u0730-\u074C\u07A6-\u07B0"
    "\u07EB-\u07F3\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09BC"
    "\u09BE-\u09C4\u09C7-\u09C8\u09CB-\u09CD\u09D7\u09E2-\u09E3\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F"
    "\u0A81-\u0A83\u0ABC\u0ABE-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03"
    "\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48\u0E31\u0E34-\u0E3A\u0E47-\u0E4E\u0EB1\u0EB4-\u0EBC"
    "\u0EC8-\u0ECD\u1885-\u1886")
_JAVA_NOT_LETTERS = ("\u037F\u0528-\u052F\u0560\u0588\u05EF\u0860-\u086A\u0870-\u0887\u0889-\u088E\u08A1\u08AD-\u08C9"
    "\u0978\u0980\u09FC\u0AF9\u0C34\u0C5A\u0C5D\u0C80\u0CDD\u0D04\u0D54-\u0D56\u0D5F\u0E86\u0E89\u0E8C"
    "\u0E8E-\u0E93\u0E98\u0EA0\u0EA8-\u0EA9\u0EAC\u13F5\u13F8-\u13FD\u16F1-\u16F8\u170D\u171F\u1878"
    "\u191D-\u191E\u19B0-\u19C0\u19C8-\u19C9\u1B4C\u1C80-\u1C88\u1C90-\u1CBA\u1CBD-\u1CBF\u1CF2-\u1CF3"
    "\u1CFA\u2C2F\u2C5F\u312E-\u312F\u31BB-\u31BF\u4DB6-\u4DBF\u9FCD-\u9FFF\uA698-\uA69D\uA78F"
    "\uA794-\uA79F\uA7AB-\uA7CA\uA7D0-\uA7D1\uA7D3\uA7D5-\uA7D9\uA7F2-\uA7F7\uA8FD-\uA8FE\uA9E0-\uA9E4"
    "\uA9E6-\uA9EF\uA9FA-\uA9FE\uAA7E-\uAA7F\uAB30-\uAB5A\uAB5C-\uAB69\uAB70-\uABBF")
_JAVA_NOT_DIGITS = "\u0DE6-\u0DEF\uA9F0-\uA9F9"
_JAVA_EXTRA_MISC = "\u0600-\u0603\u0614\u2427-\u243F\u244B-\u249B\u24EA-\u24FF\u2776-\u2793\u2B74-\u2B75\u2B96\u30FB"
_L = (rf"(?:[^\W\d_{_NOT_LETTER}{_JAVA_NOT_LETTERS}]|"  # a letter (as Java knew them), soft hyphen, accents
      rf"[\u00AD\u0300-\u036F{_JAVA_EXTRA_LETTERS}])")
_D = rf"[^\D{_JAVA_NOT_DIGITS}]"
_LD = rf"(?:{_L}|{_D})"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_NL = r"\n"
_SPACENL = r"[ \t\u00A0\u2000-\u200A\u3000\n]"
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = r"(?:['`\u0092\u2019\u0091\u2018\u201B]|&apos;)"
_SPLET = r"&[aeiouAEIOU](?i:acute|grave|uml);"
_LETTER = rf"(?:{_L}|{_SPLET})"
_WORD = rf"{_LETTER}(?:{_LETTER}|{_D})*(?:[.!?]{_LETTER}(?:{_LETTER}|{_D})*)*"
_REDAUX = rf"{_APOS}(?i:[msd]|re|ve|ll)"
_SWORD = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
_SGML_NAME = r"[A-Za-z][A-Za-z0-9_:.\-]*"
_SGML = (rf"<(?:[!?][A-Za-z\-][^>\r\n]*|{_SGML_NAME}(?: +(?:{_SGML_NAME} *= *(?:'[^'\r\n]*'|\"[^\"\r\n]*\"|"
         rf"{_SGML_NAME})|{_SGML_NAME}))* */?|/{_SGML_NAME}) *>")
_NUM = rf"{_D}+(?:[.:,\u00AD\u066B\u066C]{_D}+)*|[.:,\u00AD\u066B\u066C]{_D}+(?:[.:,\u00AD\u066B\u066C]{_D}+)*"
_NUMBER = rf"[\-+]?(?:{_NUM})"
_HYPHEN = r"[-_\u058A\u2010\u2011]"
_THINGPART = rf"(?:[dDoOlL]{_APOSETC}{_LD})?{_LD}+"
_THING = rf"{_THINGPART}(?:{_HYPHEN}{_THINGPART})*"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])*|(?i:Canada|Sino|Korean|EU|Japan|non)-(?i:U\.S)|(?i:U\.S\.)-(?i:U\.K|U\.S\.S\.R)"
_ACRO2 = r"[A-Za-z](?:\.[A-Za-z])+|(?i:Canada|Sino|Korean|EU|Japan|non)-(?i:U\.S)|(?i:U\.S\.)-(?i:U\.K|U\.S\.S\.R)"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:(?:{_ACRO2})\.|[A-Za-z0-9\u00AD]+))+"
_ABMONTH = r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec"
_ABDAYS = r"Mon|Tues?|Wed|Thu(?:rs)?|Fri"
# (?-i:X) marks letters that are case sensitive in the original (a character class there).
_ABSTATE = (r"Ala|Ariz|(?-i:A)z|(?-i:A)rk|Calif|Colo|Conn|Ct|Dak|(?-i:D)el|Fla|Ga|(?-i:I)ll|Ind|Kans?|Ky|(?-i:L)a|"
            r"(?-i:M)ass|Md|Mich|Minn|(?-i:M)iss|Mo|Mont|Neb|Nev|Okla|(?-i:O)re|(?-i:P)a|Penn|Tenn|(?-i:T)ex|Va|Vt|"
            r"(?-i:W)ash|Wisc?|Wyo")
_ABCOMP = r"Inc|Cos?|Corp|Pp?t(?-i:[ye])s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys"
_ABNUM = r"tel|est|ext|sq"
_ABPTIT = r"Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq"
_ABBREV1 = rf"(?i:{_ABMONTH}|{_ABDAYS}|{_ABSTATE}|{_ABCOMP}|{_ABNUM}|{_ABPTIT}|etc|al|seq|Bldg)\."
_ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|pp|op)\."
_ABTITLE = (r"Mr|Mrs|Ms|(?-i:M)iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|"
            r"Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|"
            r"Mme|Msgr|Sfc")
# Python's alternation takes the first alternative that matches, JFlex the longest: the acronym comes
# first so that "a.k.a.i.e." is one acronym, not "a.k.a" (a title can never be a longer match).
_ABBREV4 = (rf"{_ACRO}|"
            rf"(?i:{_ABTITLE}|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|Invt|Elec|Natl|M(?-i:[ft])g|Dept)")
_SENT_WORDS = ("About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last|Many|"
               "More|Mr\\.|Ms\\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Their|Then|There|These|"
               "They|This|We|When|While|What|Yet|You")
# The first letter of each word is case sensitive ([A]bout in the original), the rest caseless.
_SENT_WORDS_RE = "|".join(w[0] + "(?i:" + w[1:] + ")" if len(w) > 1 else w for w in _SENT_WORDS.split("|"))
_FILE_EXT = (r"bat|bmp|bz2|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|"
             r"ppt|ps|py|sql|tar|txt|wav|x|xml|zip|3gp|wm[va]|avi|flv|mp[34g]")
_PHONE = (r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}"
          r"[\- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}")
_QUOTES = (r"[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB"
           rf"\u00BB]{{1,2}}|''|{_APOS}")
# Single characters the tokenizer keeps as tokens of their own (symbols, punctuation of many scripts).
_MISC = ("\u00A1-\u00A9\u00AB-\u00AC\u00AE-\u00B1\u00B4\u00B6-\u00B8\u00BB\u00BF\u00D7\u00F7\u02C2-\u02C5\u02D2-\u02DF"
         "\u02E5-\u02EB\u02ED\u02EF-\u02FF\u0375\u037E\u0384-\u0385\u0387\u03F6\u055A-\u055F\u0589\u05BE\u05C0\u05C3"
         "\u05C6\u05F3-\u05F4\u0606-\u060C\u061B\u061E-\u061F\u066A\u066D\u06D4\u06DE\u06E9\u06FD-\u06FE\u0700-\u070D"
         "\u07F6-\u07F8\u0964-\u0965\u0E3F\u0E4F\u1FBD\u2013-\u2023\u2026\u2030-\u203B\u203E-\u2042\u2044\u207A-\u207E"
         "\u208A-\u208E\u20A0\u20A4\u20AC\u2100-\u2101\u2103-\u2106\u2108-\u2109\u2114\u2116-\u2118\u211E-\u2123\u2125"
         "\u2127\u2129\u212E\u213A-\u213B\u2140-\u2144\u214A-\u214D\u214F\u2190-\u2426\u2440-\u244A\u249C-\u24E9"
         "\u2500-\u2775\u2794-\u2B73\u2B76-\u2B95\u2B97-\u2BFF\u3001-\u3002\u3012\uFF01-\uFF0F\uFF1A-\uFF20"
         "\uFF3B-\uFF40\uFF5B-\uFF65\uFFE0-\uFFE1\uFFE5-\uFFE6" + _JAVA_EXTRA_MISC)

# ---------------------------------------------------------------------------------------------
# Token normalizations (the lexer actions).
# ---------------------------------------------------------------------------------------------
_LEFT_SINGLE = re.compile("[\u0091\u2018\u201B\u2039]")
_RIGHT_SINGLE = re.compile("[\u0092\u2019\u203A]")
_LEFT_DOUBLE = re.compile("[\u0093\u201C\u00AB]")
_RIGHT_DOUBLE = re.compile("[\u0094\u201D\u00BB]")


def _quotes(tok: str, left: bool) -> str:
    """LaTeX-style quotes: ' -> ` or ', " -> `` or '' (by the guessed side), curly quotes by shape."""
    if left:
        tok = tok.replace("&apos;", "`").replace("'", "`").replace('"', "``").replace("&quot;", "``")
    else:
        tok = tok.replace("&apos;", "'").replace('"', "''").replace("&quot;", "''")
    tok = _LEFT_SINGLE.sub("`", tok)
    tok = _RIGHT_SINGLE.sub("'", tok)
    tok = _LEFT_DOUBLE.sub("``", tok)
    return _RIGHT_DOUBLE.sub("''", tok)


def _soft(tok: str) -> str:
    out = tok.replace("\u00AD", "")
    return out if out else "-"


def _currency(tok: str) -> str:
    tok = tok.replace("\u00A2", "cents").replace("\u00A3", "#")
    return re.sub("[\u0080\u00A4\u20A0\u20AC]", "$", tok)


_FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _paren(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


def _nbsp(tok: str) -> str:
    return tok.replace(" ", "\u00A0")


_SINGLE = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-", "&lt;": "<",
           "&gt;": ">"}

# Actions: what the lexer does with a match. T = emit (normalized), SKIP = whitespace, NL = end of line,
# PUSH<n> = emit all but the last n characters, ACRONYM / DUP = the sentence-final period handling.
T, SKIP, NL, PUSH2, PUSH3, ACRONYM, DUP = range(7)


class _Rule:
    __slots__ = ("name", "regex", "first", "action", "norm")

    def __init__(self, name, pattern, first, action=T, norm=None):
        self.name = name
        self.regex = re.compile(pattern)
        self.first = None if first is None else re.compile(first)  # which characters it can start with
        self.action = action
        self.norm = norm


_F_APOS = "['\u0092\u2019&]"
_F_LETTER = rf"[^\W\d_]|[\u00AD\u0300-\u036F&{_JAVA_EXTRA_LETTERS}]"
_F_NUM = r"[\d\-+.:,\u00AD\u066B\u066C]"

# The rules, in the priority order of the original lexer (an earlier rule wins a tie in length).
# Patterns with a named group `t` have trailing context: the token is `t`, but the whole match counts
# for the longest-match decision (as in JFlex).
_RULES = [
    _Rule("assim3", r"(?i:cannot|'twas)", "[cC']", PUSH3),
    _Rule("assim2", rf"(?i:{_APOS}tis|gonna|gotta|lemme|gimme|wanna)", f"{_F_APOS}|[gGlLwW]", PUSH2),
    _Rule("sgml", _SGML, "<", norm=_nbsp),
    _Rule("spmdash", r"&(?i:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", "[&\u0096\u0097\u2013-\u2015]",
          norm=lambda t: "--"),
    _Rule("spamp", r"(?i:&amp;)", "&", norm=lambda t: "&"),
    _Rule("sppunc", r"&(?i:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", "&"),
    _Rule("word_redaux", rf"(?P<t>{_WORD}){_REDAUX}", _F_LETTER, norm=_soft),
    _Rule("sword_sredaux", rf"(?P<t>{_SWORD}){_SREDAUX}", "[A-Za-z\u00AD]", norm=_soft),
    _Rule("word", _WORD, _F_LETTER, norm=_soft),
    _Rule("apoword", rf"{_APOS}(?i:n){_APOS}?|[lLdDjJ]{_APOS}|(?i:Dunkin|somethin|ol){_APOS}|{_APOS}(?i:em)|"
                     rf"[A-HJ-XZn]{_APOSETC}{_L}{{2}}{_L}*|{_APOS}[2-9]0(?i:s)|{_APOS}(?i:till?)|"
                     rf"{_L}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_L}*|{_APOS}(?i:cause)|(?i:o){_APOSETC}(?i:o)|(?i:cont'd\.?|'twas|"
                     r"nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", f"{_F_APOS}|{_F_LETTER}"),
    _Rule("apoword2", rf"(?P<t>(?i:y){_APOS}){_L}", "[yY]"),
    _Rule("fullurl", r"(?i:https?|ftp)://[^ \t\n\f\r\"<>|(){}\u00A0]+[^ \t\n\f\r\"<>|.!?(){},\u00A0-]", "[hHfF]"),
    _Rule("likelyurl", r"(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}|"
                       r"(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu))"
                       r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?", None),
    _Rule("email", r"(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
                   r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:(?i:&gt;)|>)?", "[a-zA-Z0-9<&]"),
    _Rule("twitter", rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{_L}+", "[@#]"),  # not the full-width @ # (Java splits)
    _Rule("redaux_ctx", rf"(?P<t>{_REDAUX})[^A-Za-z]", _F_APOS, norm=lambda t: _quotes(t, False)),
    _Rule("sredaux", _SREDAUX, "[nN]", norm=lambda t: _quotes(t, False)),
    _Rule("date", rf"{_D}{{1,2}}[\-/]{_D}{{1,2}}[\-/]{_D}{{2,4}}", r"\d"),
    _Rule("number", _NUMBER, _F_NUM, norm=_soft),
    _Rule("subsupnum", r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)",
          "[\u207A\u207B\u208A\u208B\u2070\u00B9\u00B2\u00B3\u2074-\u2079\u2080-\u2089]"),
    _Rule("frac", rf"(?:{_D}{{1,4}}[- \u00A0])?{_D}{{1,4}}(?:\\?/|\u2044){_D}{{1,4}}", r"\d", norm=_nbsp),
    _Rule("frac2", r"[\u00BC\u00BD\u00BE\u2153-\u215E]", r"[\u00BC\u00BD\u00BE\u2153-\u215E]",
          norm=lambda t: _FRACTIONS.get(t, t)),
    _Rule("tbspec", rf"-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-|(?i:C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|"
                    rf"Cap{_APOS}n|c{_APOS}est)", "[-cCpPaAsS]", norm=lambda t: re.sub("(?i)&amp;", "&", t)),
    _Rule("thing3", r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", "[A-Za-z0-9]"),
    _Rule("dolsign", r"[A-Z]*\$|#", "[A-Z$#]"),
    _Rule("dolsign2", "[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]",
          "[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]", norm=_currency),
    _Rule("acronym", rf"(?P<t>(?:{_ACRO})\.)(?:{_SPACENL})+(?:{_SENT_WORDS_RE}|{_SGML}){_SPACENL}", "[A-Za-z]",
          ACRONYM),
    _Rule("abbrev3", rf"(?P<t>{_ABBREV3}){_SPACENL}?{_D}", "[A-Za-z]"),
    _Rule("abbrev1_sentend", rf"(?P<t>{_ABBREV1}){_SPACENL}(?:{_SPACENL}|[{_UPPER}]|{_SGML})", "[A-Za-z]", DUP),
    _Rule("abbrev1_any2", rf"(?P<t>{_ABBREV1})[\s\S]{{2}}", "[A-Za-z]"),
    _Rule("abbrev1_end", _ABBREV1, "[A-Za-z]", DUP),  # wins only near the end of the text
    _Rule("abbrev2", rf"(?:{_ABBREV4})\.", "[A-Za-z]"),
    _Rule("abbrev4_space", rf"(?P<t>{_ABBREV4}){_SPACE}", "[A-Za-z]"),
    _Rule("acro_spacenl", rf"(?P<t>{_ACRO}){_SPACENL}", "[A-Za-z]"),
    _Rule("tbspec2", rf"(?P<t>{_APOS}[0-9][0-9]){_SPACENL}", _F_APOS),
    _Rule("filename", rf"(?P<t>{_LD}+(?:\.{_LD}+)*\.(?i:{_FILE_EXT}))(?:{_SPACENL}|[.?!,\"<])", _F_LETTER + r"|\d"),
    _Rule("word_dot", rf"(?P<t>{_WORD}\.)[,;:]", _F_LETTER, norm=_soft),
    _Rule("phone", _PHONE, r"[(0-9]", norm=lambda t: _paren(_nbsp(t))),
    _Rule("dblquot_left", r"(?P<t>\"|(?i:&quot;))[A-Za-z0-9$]", '["&]', norm=lambda t: _quotes(t, True)),
    _Rule("dblquot", r"\"|(?i:&quot;)", '["&]', norm=lambda t: _quotes(t, False)),
    _Rule("plus", r"\+", r"\+"),
    _Rule("percent", "[%&\u2030\u2031]", "[%&\u2030\u2031]"),
    _Rule("tilde", r"[~^|\\]", r"[~^|\\]"),
    _Rule("lt_gt", r"<<|>>|[<>]|(?i:&lt;|&gt;)", "[<>&]", norm=lambda t: _SINGLE.get(t.lower(), t)),
    _Rule("brackets", r"[\[\]{}()]", r"[\[\]{}()]", norm=lambda t: _SINGLE[t]),
    _Rule("hyphens", r"-+", "-", norm=lambda t: "--" if 3 <= len(t) <= 4 else t),
    _Rule("ldots", "\\.{3,5}|(?:\\.[ \u00A0]){2,4}\\.|[\u0085\u2026]", "[.\u0085\u2026]", norm=lambda t: "..."),
    _Rule("fnmarks", r"@+|#+|_+", "[@#_]"),
    _Rule("asts", r"\*+|(?:\\\*){1,3}", r"[*\\]"),
    _Rule("insentp", r"[,;:]", r"[,;:]"),
    _Rule("qmark", r"[?!]+", r"[?!]"),
    _Rule("period", "[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA]",
          "[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA]"),
    _Rule("equals", r"=", "="),
    _Rule("slash", r"/", "/"),
    _Rule("hthing_dot", rf"(?P<t>{_HTHING}\.)[,;:]", "[A-Za-z0-9]", norm=_soft),
    _Rule("hthing", _HTHING, "[A-Za-z0-9]", norm=_soft),
    _Rule("thing_dot", rf"(?P<t>{_THING}\.)[,;:]", _F_LETTER + r"|\d"),
    _Rule("thing", _THING, _F_LETTER + r"|\d"),
    _Rule("thinga_dot", r"(?P<t>[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+\.)[,;:]", "[A-Z]",
          norm=lambda t: re.sub("(?i)&amp;", "&", t)),
    _Rule("thinga", r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+", "[A-Z]", norm=lambda t: re.sub("(?i)&amp;", "&", t)),
    _Rule("quote_left", r"(?P<t>')[A-Za-z][^ \t\n\r\u00A0]", "'", norm=lambda t: _quotes(t, True)),
    _Rule("redaux", _REDAUX, _F_APOS, norm=lambda t: _quotes(t, False)),
    _Rule("quotes", _QUOTES, "[&'`\u2018-\u201F\u0091-\u0094\u2039\u203A\u00AB\u00BB]",
          norm=lambda t: _quotes(t, False)),
    _Rule("smiley", r"(?P<t>[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]])[^A-Za-z0-9]", "[<>:;=]", norm=_paren),
    _Rule("asiansmiley", r"[\-^x=~<>']_[\-^x=~<>']|\([\-^x=~<>'][_.]?[\-^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\)",
          "[-^x=~<>'(]", norm=_paren),
    _Rule("misc", f"[{_MISC}]", f"[{_MISC}]"),
    _Rule("space", "[ \t\u00A0\u2000-\u200A\u3000\u0000\u200B\u200E\u200F\uFEFF]+|(?i:&nbsp;)",
          "[ \t\u00A0\u2000-\u200A\u3000\u0000\u200B\u200E\u200F\uFEFF&]", SKIP),
    _Rule("newline", r"\n", r"\n", NL),
]

_FAST_WORD = re.compile(r"[A-Za-z]+(?=[ \n]|\Z)")
_ASSIMILATED = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])
_OTHER_BREAKS = re.compile("[\r\u2028\u2029\u000B\u000C]")
_candidates_cache: dict[str, tuple[_Rule, ...]] = {}


def _candidates(ch: str) -> tuple[_Rule, ...]:
    """The rules that can match at a position that starts with `ch` (computed once per character)."""
    rules = _candidates_cache.get(ch)
    if rules is None:
        rules = tuple(r for r in _RULES if r.first is None or r.first.match(ch))
        _candidates_cache[ch] = rules
    return rules


def _lex(text: str) -> list[list[str]]:
    """Lex `text` (lines separated by \\n) into lower-cased tokens, one list per line."""
    lines: list[list[str]] = [[]]
    out = lines[0]
    pos, n = 0, len(text)
    fast = _FAST_WORD.match
    while pos < n:
        m = fast(text, pos)
        if m is not None:
            word = m.group().lower()
            if word not in _ASSIMILATED:
                out.append(word)
                pos = m.end()
                continue
        ch = text[pos]
        best, best_len, best_rule = None, 0, None
        for rule in _candidates(ch):
            mm = rule.regex.match(text, pos)
            if mm is not None and mm.end() - pos > best_len:
                best, best_len, best_rule = mm, mm.end() - pos, rule
        if best is None:  # untokenizable character: deleted (it still separates tokens)
            pos += 1
            continue
        action = best_rule.action
        if action == SKIP:
            pos = best.end()
            continue
        if action == NL:
            out = []
            lines.append(out)
            pos = best.end()
            continue
        end = best.end("t") if "t" in best_rule.regex.groupindex else best.end()
        tok = text[pos:end]
        if action == PUSH3 or action == PUSH2:
            end -= 3 if action == PUSH3 else 2
            tok = text[pos:end]
        elif action == ACRONYM:
            if len(tok) == 2:  # "I." before "The": the letter, then the period
                end -= 1
                tok = tok[:-1]
            else:  # "U.S." before "The": the acronym with its period, then a period again
                end -= 1
        elif action == DUP:  # "etc." ending a sentence: "etc." then a period again
            end -= 1
        if best_rule.norm is not None:
            tok = best_rule.norm(tok)
        out.append(tok.lower())
        pos = end
    return lines


def ptb_tokens(text: str) -> list[str]:
    """The lower-cased tokens the Stanford PTBTokenizer (as run by pycocoevalcap) makes of `text`,
    punctuation included (line breaks are treated as spaces)."""
    return [tok for line in _lex(_OTHER_BREAKS.sub(" ", text.replace("\n", " "))) for tok in line]


def tokenize_caption(caption: str) -> str:
    """One caption as pycocoevalcap tokenizes it when it is the only caption of its batch."""
    return tokenize_captions([caption])[0]


def tokenize_captions(captions: Iterable[str]) -> list[str]:
    """pycocoevalcap's tokenization of a batch of captions, in order: each caption becomes its
    lower-cased PTB tokens, minus :data:`PUNCTUATIONS`, joined by single spaces.

    The batch is lexed as one text (one caption per line), as the Java tokenizer sees it, so the
    result is the same as pycocoevalcap's for the same captions in the same order."""
    captions = [_OTHER_BREAKS.sub(" ", c.replace("\n", " ")) for c in captions]
    if not captions:
        return []
    lines = _lex("\n".join(captions))
    return [" ".join(tok for tok in line if tok not in PUNCTUATIONS) for line in lines[: len(captions)]]
