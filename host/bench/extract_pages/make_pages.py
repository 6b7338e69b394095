#!/usr/bin/env python3
"""Writes the saved pages of the extraction comparison (host/bench/extract_compare.py): each
page NAME.html beside NAME.gold.txt, the hand-chosen main text of the page.

The pages are written here, not fetched: every page is made of its main content (blocks of
headings, paragraphs, lists, code and tables, written out below) inside the chrome a real site
puts around it — navigation, breadcrumbs, cookie banners, sidebars, share buttons, related
links, comment sections, newsletter boxes, footers, scripts and styles — in one of several
layouts (semantic HTML5, a div soup with class names only, an old table layout, a docs site,
a forum). The gold is the main content's own text, one block a line group: headings and
paragraphs as lines, list items as "- item" lines, code as it is, table rows as cells joined
by " | ". Comments under an article are not main text; the posts of a forum thread are.
The pages named holdout_* were written after ftx's boilerplate rules were chosen (on the
others), so that the comparison has an out-of-sample part.

    python make_pages.py [OUT_DIR]   (default: this script's folder)
"""
import html
import os
import sys

E = html.escape

# ---- chrome -----------------------------------------------------------------------------

STYLE = """<style>
body{font-family:Georgia,serif;margin:0} .nav a{padding:4px 8px} .cookie{position:fixed;bottom:0}
.sidebar{float:right;width:30%} .ad{border:1px solid #ccc} @media (max-width:600px){.sidebar{display:none}}
</style>"""
SCRIPT = """<script>
window.dataLayer = window.dataLayer || []; function gtag(){dataLayer.push(arguments);}
gtag('js', new Date()); gtag('config', 'G-XXXXXXX');
document.addEventListener('DOMContentLoaded', function () { var b = document.querySelector('.cookie button');
if (b) b.addEventListener('click', function () { document.cookie = 'consent=1'; }); });
</script>"""


def nav(items, cls="nav"):
    links = "".join(f'<li><a href="/{E(i.lower().replace(" ", "-"))}">{E(i)}</a></li>' for i in items)
    return f'<nav class="{cls}"><ul>{links}</ul></nav>'


def cookie(text="We use cookies to improve your experience, analyse traffic and show personalised ads. By clicking \"Accept all\" you agree to our use of cookies."):
    return f'<div class="cookie" id="cookie-consent"><p>{E(text)}</p><button>Accept all</button> <button>Manage preferences</button></div>'


def sidebar(title, links, extra=""):
    items = "".join(f'<li><a href="/p/{n}">{E(t)}</a></li>' for n, t in enumerate(links))
    return f'<aside class="sidebar"><h3>{E(title)}</h3><ul>{items}</ul>{extra}</aside>'


NEWSLETTER = '<div class="newsletter"><h4>Get the weekly digest</h4><p>Sign up for our newsletter and never miss a story.</p><form><input type="email" placeholder="Your email"><button>Subscribe</button></form></div>'
SHARE = '<div class="share">Share this: <a href="#">Facebook</a> <a href="#">Twitter</a> <a href="#">LinkedIn</a> <a href="#">Email</a></div>'
AD = '<div class="ad">Advertisement<br><a href="https://ads.example/click">Save 40% on premium plans today - limited offer</a></div>'


def footer(site, cols=("About us", "Careers", "Contact", "Privacy policy", "Terms of use", "Accessibility")):
    links = " | ".join(f'<a href="/{c.lower().replace(" ", "-")}">{E(c)}</a>' for c in cols)
    return f'<footer><p>{links}</p><p>&copy; 2024 {E(site)}. All rights reserved.</p></footer>'


def comments(items, heading="Comments"):
    out = "".join(
        f'<div class="comment"><p class="comment-author">{E(a)} <span class="date">{E(d)}</span></p><p>{E(t)}</p><a href="#reply" class="reply">Reply</a></div>'
        for a, d, t in items
    )
    return f'<section id="comments"><h3>{E(heading)} ({len(items)})</h3>{out}<form><textarea>Leave a comment</textarea><button>Post comment</button></form></section>'


def related(items):
    li = "".join(f'<li><a href="/r/{n}">{E(t)}</a></li>' for n, t in enumerate(items))
    return f'<div class="related"><h4>Related articles</h4><ul>{li}</ul></div>'


# ---- main content -------------------------------------------------------------------------


def blocks_html(blocks, inline=()):
    """The blocks as HTML; `inline` puts (position, markup) boilerplate between them, as
    sites do inside the article body (figures with credits, "read more" links, promos)."""
    out = []
    extra = dict(inline)
    for n, (kind, v) in enumerate(blocks):
        if n in extra:
            out.append(extra[n])
        if kind in ("h1", "h2", "h3", "p"):
            out.append(f"<{kind}>{E(v)}</{kind}>")
        elif kind in ("ul", "ol"):
            out.append(f"<{kind}>" + "".join(f"<li>{E(i)}</li>" for i in v) + f"</{kind}>")
        elif kind == "pre":
            out.append(f"<pre><code>{E(v)}</code></pre>")
        elif kind == "table":
            head, *rows = v
            out.append("<table><thead><tr>" + "".join(f"<th>{E(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{E(c)}</td>" for c in r) + "</tr>" for r in rows) + "</tbody></table>")
        elif kind == "quote":
            out.append(f"<blockquote><p>{E(v)}</p></blockquote>")
        else:
            raise ValueError(kind)
    return "\n".join(out)


FIGURE = '<figure><img src="/img/photo.jpg" alt=""><figcaption>Photo: Staff photographer / Agency</figcaption></figure>'
READ_MORE = '<p class="read-more"><strong>Read more:</strong> <a href="/r/9">Five things we learned this week</a></p>'
PROMO = '<div class="inline-promo"><p>Enjoying this article? Support independent writing: subscribe from 1 a month.</p><a class="button" href="/subscribe">Subscribe</a></div>'
INLINE_AD = '<div class="ad-slot">Advertisement - Continue reading below</div>'
AUTHOR = '<div class="author-bio"><p>About the author: writes about cities, food and the outdoors. Follow on social media.</p></div>'


def blocks_gold(blocks):
    out = []
    for kind, v in blocks:
        if kind in ("h1", "h2", "h3", "p", "quote"):
            out.append(v)
        elif kind in ("ul", "ol"):
            out.append("\n".join(f"- {i}" for i in v))
        elif kind == "pre":
            out.append(v)
        elif kind == "table":
            out.append("\n".join(" | ".join(r) for r in v))
    return "\n\n".join(out) + "\n"


def page(title, body, head_extra=""):
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{E(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
{STYLE}{head_extra}</head>
<body>
{body}
{SCRIPT}
</body></html>
"""


# ---- layouts ----------------------------------------------------------------------------


def semantic(site, title, blocks, *, byline="", sidebar_links=(), comment_items=(), rel=()):
    """An HTML5 news or blog page: header/nav, article, aside, comments, footer."""
    body = f"""{cookie()}
<header><a class="logo" href="/">{E(site)}</a>{nav(["Home", "World", "Business", "Technology", "Science", "Opinion", "Sport"])}</header>
<div class="breadcrumb"><a href="/">Home</a> &rsaquo; <a href="/section">Section</a></div>
<main>
<article>
<p class="byline">{E(byline)}</p>
{blocks_html(blocks, [(2, FIGURE), (4, READ_MORE), (6, PROMO)])}
{AUTHOR}
{SHARE}
</article>
{related(rel) if rel else ""}
{comments(comment_items) if comment_items else ""}
</main>
{sidebar("Most read", sidebar_links, NEWSLETTER + AD) if sidebar_links else ""}
{footer(site)}"""
    return page(f"{title} | {site}", body), blocks_gold(blocks)


def divsoup(site, title, blocks, *, sidebar_links=(), comment_items=()):
    """No semantic tags: everything is a div with class names."""
    menu = "".join(f'<div class="menu-item"><a href="/{n}">{E(t)}</a></div>' for n, t in enumerate(["Home", "Tutorials", "Guides", "Reviews", "Deals", "Forum", "Contact"]))
    side = "".join(f'<div class="widget-link"><a href="/w/{n}">{E(t)}</a></div>' for n, t in enumerate(sidebar_links))
    body = f"""<div id="wrapper">
<div class="top-bar"><div class="logo">{E(site)}</div><div class="menu">{menu}</div><div class="search"><input placeholder="Search..."></div></div>
<div class="gdpr-notice">This site uses cookies. By continuing to browse the site you are agreeing to our use of cookies. <a href="/privacy">Find out more</a> <span class="close">Got it</span></div>
<div class="page-container">
<div class="left-col">
<div class="post-meta">Posted in <a href="/c/howto">How-to</a> &middot; 6 min read</div>
<div class="entry-content">
{blocks_html(blocks, [(3, INLINE_AD), (5, READ_MORE)])}
</div>
<div class="tags">Tags: <a href="/t/1">tips</a>, <a href="/t/2">beginners</a>, <a href="/t/3">guide</a></div>
{comments(comment_items, "Discussion") if comment_items else ""}
</div>
<div class="right-col"><div class="widget"><div class="widget-title">Popular right now</div>{side}</div><div class="widget">{AD}</div></div>
</div>
<div class="site-footer"><div class="footer-links"><a href="/about">About</a> <a href="/advertise">Advertise</a> <a href="/privacy">Privacy</a> <a href="/contact">Contact</a></div><div class="copyright">Copyright 2023 {E(site)}. All rights reserved.</div></div>
</div>"""
    return page(f"{title} - {site}", body), blocks_gold(blocks)


def tables(site, title, blocks):
    """An old site laid out with tables."""
    left = "".join(f'<a href="/{n}.html">{E(t)}</a><br>' for n, t in enumerate(["Home", "News", "Members", "Downloads", "Links", "Guestbook", "Contact"]))
    body = f"""<table width="100%" border="0" cellpadding="0" cellspacing="0">
<tr><td colspan="2" class="banner"><font size="5">{E(site)}</font><br><small>Serving the community since 1998</small></td></tr>
<tr><td width="160" valign="top" class="leftnav">{left}<br><small>Visitors: 182,331</small></td>
<td valign="top" class="content">
{blocks_html(blocks)}
</td></tr>
<tr><td colspan="2" align="center"><small>Last updated March 2024 &middot; Webmaster: <a href="mailto:web@example.org">web@example.org</a> &middot; Best viewed at 1024x768</small></td></tr>
</table>"""
    return page(title, body), blocks_gold(blocks)


def docs(site, title, blocks, toc):
    """A documentation site: top bar, left navigation tree, on-page contents, prev/next."""
    tree = "".join(f'<li class="toctree-l1"><a href="/{n}.html">{E(t)}</a></li>' for n, t in enumerate(toc))
    onpage = "".join(f'<li><a href="#{n}">{E(v)}</a></li>' for n, (k, v) in enumerate(blocks) if k == "h2")
    body = f"""<div class="wy-grid-for-nav">
<nav class="wy-nav-side"><div class="wy-side-nav-search"><a href="/">{E(site)}</a><div class="version">v2.4</div><input placeholder="Search docs"></div>
<div class="wy-menu"><p class="caption">Contents</p><ul>{tree}</ul></div></nav>
<section class="wy-nav-content-wrap"><div class="wy-nav-content">
<div role="navigation" aria-label="breadcrumbs"><a href="/">Docs</a> &raquo; {E(title)} <a class="edit" href="https://git.example/edit">Edit on GitHub</a></div>
<div class="document" role="main" itemprop="articleBody">
{blocks_html(blocks)}
</div>
<div class="rst-footer-buttons"><a class="btn" href="/prev.html">Previous</a> <a class="btn" href="/next.html">Next</a></div>
<div class="contents local"><p>On this page</p><ul>{onpage}</ul></div>
<footer><p>&copy; Copyright 2024, The {E(site)} authors. Built with Sphinx using a theme provided by Read the Docs.</p></footer>
</div></section></div>"""
    return page(f"{title} — {site} documentation", body), blocks_gold(blocks)


def forum(site, title, posts):
    """A forum thread: each post is main text; user cards, signatures and vote buttons are not."""
    out = []
    for user, when, paras in posts:
        text = "".join(f"<p>{E(p)}</p>" for p in paras)
        out.append(f"""<div class="post" id="p{len(out)}">
<div class="postprofile"><a class="username" href="/u/{E(user)}">{E(user)}</a><br><span class="rank">Member</span><br><span>Posts: 412</span></div>
<div class="postbody"><div class="postdate">Posted {E(when)}</div><div class="content">{text}</div>
<div class="signature">-- Running Arch on a ThinkPad since 2015</div>
<div class="post-buttons"><a href="#">Quote</a> <a href="#">Report</a> <a href="#">+1</a></div></div></div>""")
    body = f"""{cookie("This board uses cookies to keep you logged in and to count visits.")}
<div class="headerbar"><a href="/">{E(site)}</a> <a href="/search">Search</a> <a href="/register">Register</a> <a href="/login">Login</a></div>
<div class="navbar"><a href="/">Board index</a> &lsaquo; <a href="/f/3">Help &amp; Support</a></div>
<h2 class="topic-title">{E(title)}</h2>
<div class="action-bar"><a href="/reply">Post Reply</a> <span>{len(posts)} posts &bull; Page 1 of 1</span></div>
{"".join(out)}
<div class="action-bar"><a href="/reply">Post Reply</a> <a href="/f/3">Return to Help &amp; Support</a></div>
<div class="stat-block"><h3>Who is online</h3><p>Users browsing this forum: No registered users and 4 guests</p></div>
{footer(site, ("Board index", "Contact us", "The team", "Delete cookies", "All times are UTC"))}"""
    return page(f"{title} - {site}", body), forum_gold(title, posts)


def forum_gold(title, posts):
    return title + "\n\n" + "\n\n".join(p for _, _, paras in posts for p in paras) + "\n"


# ---- the pages --------------------------------------------------------------------------

MOST_READ = ["Markets slide as rate fears return", "The best hiking boots of the year, tested", "Why your houseplants keep dying",
             "Ten quiet towns worth a weekend", "What the new tax rules mean for renters"]
NEWS_COMMENTS = [
    ("riverside_dan", "2 hours ago", "About time. I cycle down Harbour Road every day and the trucks come within inches of my elbow."),
    ("M. Okafor", "1 hour ago", "Nobody asked the shop owners on Mill Street whether losing forty parking spaces would hurt them."),
    ("pedalpower", "54 minutes ago", "Same story every few years: a plan, a vote, then nothing gets built. I will believe it when I see paint."),
]

PAGES = {}

PAGES["news_bike_lanes"] = lambda: semantic("The Harbour Gazette", "Council approves protected bike lanes on Harbour Road", [
    ("h1", "Council approves protected bike lanes on Harbour Road"),
    ("p", "The city council voted seven to two on Tuesday night to build a two-kilometre protected bike lane along Harbour Road, ending a debate that has run for almost four years."),
    ("p", "The lane will separate cyclists from traffic with concrete kerbs and planters between the ferry terminal and the Mill Street junction. Construction is expected to start in early spring and to take about five months."),
    ("p", "Councillor Ruth Abara, who proposed the scheme, said the road had seen eleven collisions involving cyclists in the past two years. \"People have been asking for this for a long time, and the numbers finally made the case,\" she said."),
    ("h2", "Parking and deliveries"),
    ("p", "The plan removes forty on-street parking spaces. To make up for them, the council will open the ferry car park to short-stay parking and add two loading bays for deliveries on Mill Street."),
    ("p", "Opponents argued that the cost, estimated at 3.2 million, would be better spent on repairing existing roads. The two councillors who voted against the scheme asked for a six-month trial with temporary barriers first."),
    ("p", "The council will hold two public drop-in sessions next month to show the final design."),
], byline="By Clara Menon, Local Affairs Reporter · 12 March 2024", sidebar_links=MOST_READ, comment_items=NEWS_COMMENTS,
    rel=["Harbour Road resurfacing delayed again", "Cycle hire scheme expands to the east side", "Letters: what readers think of the new bus routes"])

PAGES["blog_sourdough"] = lambda: divsoup("Crumb & Crust", "A simple sourdough loaf for beginners", [
    ("h1", "A simple sourdough loaf for beginners"),
    ("p", "This is the loaf I teach in my weekend classes. It needs no special equipment beyond a large bowl, a kitchen scale and a lidded pot, and it forgives a little sloppiness with timing."),
    ("h2", "Ingredients"),
    ("ul", ["450 g strong white bread flour", "50 g wholemeal flour", "350 g water at room temperature", "100 g active sourdough starter", "10 g fine sea salt"]),
    ("h2", "Method"),
    ("ol", ["Mix the flour and 320 g of the water and leave it covered for an hour.",
            "Add the starter, the salt and the rest of the water, and squeeze everything together until no dry flour is left.",
            "Over the next two hours, give the dough four sets of stretches and folds, thirty minutes apart.",
            "Let it rise until it has grown by about half, then shape it into a tight ball and put it in a floured basket.",
            "Leave the basket in the fridge overnight, then bake in the preheated pot at 240 degrees, twenty minutes with the lid on and twenty-five with it off."]),
    ("p", "Let the loaf cool for at least an hour before you cut it. The crumb keeps cooking as it cools, and cutting early makes it gummy."),
], sidebar_links=["Rye starter troubleshooting", "Our favourite bread knives", "How to store a loaf", "Focaccia in one afternoon"],
    comment_items=[("Jana", "June 3, 2023", "Made this yesterday and it came out great, though my dough was very sticky at the folding stage."),
                   ("Tom R.", "June 5, 2023", "Can I use a baking stone instead of a pot? I do not have a Dutch oven.")])

PAGES["docs_install"] = lambda: docs("Tidewater", "Installation", [
    ("h1", "Installation"),
    ("p", "Tidewater runs on Linux, macOS and Windows and needs Python 3.9 or later. The package has no compiled dependencies, so installing it takes a few seconds."),
    ("h2", "From PyPI"),
    ("p", "Install the latest release into a virtual environment:"),
    ("pre", "python -m venv .venv\nsource .venv/bin/activate\npip install tidewater"),
    ("h2", "Optional extras"),
    ("p", "Some features need extra packages. Install them by name:"),
    ("ul", ["tidewater[plot] adds charts through matplotlib", "tidewater[s3] reads and writes files on S3", "tidewater[all] installs every extra"]),
    ("h2", "Checking the installation"),
    ("p", "Run the version command. It prints the installed version and the path of the configuration file it found."),
    ("pre", "tidewater --version"),
    ("p", "If the command is not found, make sure the virtual environment is active and that its bin folder is on your PATH."),
], ["Introduction", "Installation", "Quick start", "Configuration", "Command line", "API reference", "Changelog", "FAQ"])

PAGES["docs_api_table"] = lambda: docs("Tidewater", "tidewater.read_csv", [
    ("h1", "tidewater.read_csv"),
    ("p", "Reads a comma-separated file into a table. Columns are typed from their first thousand values unless a schema is given."),
    ("pre", "tidewater.read_csv(path, schema=None, delimiter=',', skip_rows=0)"),
    ("h2", "Parameters"),
    ("table", [["Name", "Type", "Description"],
               ["path", "str or Path", "The file to read; a URL starting with s3:// needs the s3 extra."],
               ["schema", "dict or None", "Column names mapped to types; columns not named are inferred."],
               ["delimiter", "str", "The field separator, a single character."],
               ["skip_rows", "int", "Lines to skip before the header row."]]),
    ("h2", "Returns"),
    ("p", "A Table holding the rows of the file in their original order."),
    ("h2", "Raises"),
    ("p", "SchemaError when a value cannot be converted to the type its column was given. The message names the row and the column."),
], ["Introduction", "Installation", "Quick start", "API reference", "read_csv", "write_csv", "Table", "Changelog"])

PAGES["forum_wifi"] = lambda: forum("LinuxQuestions Board", "Wi-Fi drops every few minutes after kernel update", [
    ("kestrel", "Mon Feb 12, 2024 9:14 am", ["Since updating to kernel 6.7 last week, my laptop loses its Wi-Fi connection every five to ten minutes. It reconnects on its own after about thirty seconds, but video calls are impossible.",
                                            "The card is an Intel AX201. Rolling back to 6.6 fixes it, so I am fairly sure it is the kernel and not the router."]),
    ("m_delacroix", "Mon Feb 12, 2024 10:02 am", ["Check the kernel log while it happens. If you see firmware crash messages from iwlwifi, it is probably the power saving bug that several people reported for that card.",
                                                  "Try disabling power saving for the driver and see if the drops stop."]),
    ("kestrel", "Mon Feb 12, 2024 6:40 pm", ["You were right, the log shows a firmware error right before each drop. I set power_save to 0 in the modprobe configuration and rebooted. Three hours without a single drop so far."]),
    ("nightowl", "Tue Feb 13, 2024 8:21 am", ["Same card, same problem here. The workaround fixed it for me too. A fixed firmware is supposed to land in the next linux-firmware release, so you can remove the option after that."]),
])

PAGES["qa_git_undo"] = lambda: semantic("DevAnswers", "How do I undo the last commit but keep my changes?", [
    ("h1", "How do I undo the last commit but keep my changes?"),
    ("p", "I committed some files too early and want to take the commit back, but I do not want to lose the edits. The commit has not been pushed yet."),
    ("h2", "Answer"),
    ("p", "Use a soft reset to move the branch back by one commit. Your changes stay staged, exactly as they were just before you committed."),
    ("pre", "git reset --soft HEAD~1"),
    ("p", "If you would rather have the changes unstaged, use a mixed reset instead, which is the default mode:"),
    ("pre", "git reset HEAD~1"),
    ("p", "Do not use a hard reset here. It throws the changes away along with the commit."),
    ("h2", "Another answer"),
    ("p", "If the commit was already pushed, revert it instead of resetting, so that you do not rewrite history other people have pulled."),
], byline="Asked 3 years ago · Viewed 2.1m times", sidebar_links=["Hot network questions", "Why is my regex so slow?", "Tabs or spaces in YAML?", "How to rename a branch"])

PAGES["product_kettle"] = lambda: divsoup("HomeGoods Direct", "Stovetop kettle 1.7 L, brushed steel", [
    ("h1", "Stovetop kettle 1.7 L, brushed steel"),
    ("p", "A classic whistling kettle made from a single sheet of brushed stainless steel. The encapsulated base spreads heat evenly and works on gas, electric and induction hobs."),
    ("p", "The handle stays cool while the water boils, and the spout opens with a thumb trigger so you never touch the hot lid."),
    ("h2", "Specifications"),
    ("ul", ["Capacity: 1.7 litres", "Material: 18/10 stainless steel", "Weight: 1.1 kg", "Suitable for all hob types, including induction", "Dishwasher safe body; hand wash the whistle"]),
    ("h2", "In the box"),
    ("p", "The kettle, a removable whistle and a care leaflet."),
], sidebar_links=["Customers also bought: ceramic teapot", "Glass storage jars, set of 3", "Bamboo trivet", "Electric milk frother"],
    comment_items=[("Verified buyer", "5 stars", "Boils quickly on our induction hob and the whistle is loud enough to hear from the garden."),
                   ("Sam", "3 stars", "Looks lovely but the lid is a bit stiff to open.")])

PAGES["wiki_lighthouse"] = lambda: semantic("OpenEncyclopedia", "Skerry Point Lighthouse", [
    ("h1", "Skerry Point Lighthouse"),
    ("p", "Skerry Point Lighthouse is an active lighthouse on the northern tip of Skerry Island. It was built between 1851 and 1854 to a design by the engineer Alan Brodie and is one of the tallest masonry towers on the coast."),
    ("h2", "History"),
    ("p", "Shipping losses on the reef north of the island led the harbour board to petition for a light in 1846. Granite for the tower was quarried on the island itself and lifted into place with a steam crane, one of the first used for such work."),
    ("p", "The light was automated in 1988, and the keepers' cottages were sold two years later. They are now holiday lets."),
    ("h2", "Characteristics"),
    ("table", [["Height", "38 metres"], ["Focal height", "53 metres"], ["Range", "23 nautical miles"], ["Characteristic", "two white flashes every 20 seconds"]]),
    ("h2", "See also"),
    ("ul", ["List of lighthouses in the northern isles", "Alan Brodie (engineer)"]),
], byline="From OpenEncyclopedia, the free encyclopedia", sidebar_links=["Main page", "Random article", "Recent changes", "Help", "Donate"])

PAGES["legacy_club_news"] = lambda: tables("Westfield Radio Club", "Club news - Westfield Radio Club", [
    ("h2", "Club news"),
    ("p", "Our annual field day takes place on the last weekend of June at Hollin Farm, by kind permission of the Baxter family. Setup starts at nine on Saturday morning and we aim to be on the air by noon."),
    ("p", "We will run three stations this year: a high frequency station on the main mast, a VHF station in the caravan and a training station for newcomers who want to make their first contacts under supervision."),
    ("h3", "What to bring"),
    ("ul", ["A folding chair and something warm for the evening", "Food for the barbecue (the club provides the grill and charcoal)", "Your logbook if you want to operate"]),
    ("p", "Members with a full licence who can help with the overnight shifts should put their name on the list at the next club night."),
])

PAGES["press_release_solar"] = lambda: semantic("Northwind Energy", "Northwind Energy opens its largest solar farm", [
    ("h1", "Northwind Energy opens its largest solar farm"),
    ("p", "Northwind Energy today opened the Greyfield solar farm, a 120 megawatt plant that will produce enough electricity for about 35,000 homes a year."),
    ("p", "The farm covers 180 hectares of former arable land. Sheep graze between the rows of panels, and the company has planted four kilometres of new hedgerow around the site."),
    ("quote", "Greyfield shows that large solar farms can sit alongside farming rather than replace it, said chief executive Priya Raman."),
    ("p", "Construction took fourteen months and employed up to 250 people at its peak. A battery store of 40 megawatt hours will be added next year to shift part of the output into the evening peak."),
    ("h2", "About Northwind Energy"),
    ("p", "Northwind Energy develops and operates wind and solar plants in four countries."),
], byline="Press release · 4 September 2024", rel=["Northwind reports half-year results", "Greyfield planning approval granted"])

PAGES["changelog_release"] = lambda: docs("Tidewater", "Changelog", [
    ("h1", "Changelog"),
    ("h2", "2.4.0"),
    ("p", "Released 2 May 2024."),
    ("ul", ["read_csv accepts a skip_rows argument.", "Tables print their schema in the notebook view.", "The s3 extra no longer pins an old version of the storage client."]),
    ("h2", "2.3.1"),
    ("p", "Released 11 March 2024."),
    ("ul", ["Fixed a crash when a column held only empty strings.", "Fixed the time zone of parsed timestamps on Windows."]),
    ("h2", "2.3.0"),
    ("ul", ["Python 3.8 is no longer supported.", "Added the write_parquet function."]),
], ["Introduction", "Installation", "Quick start", "API reference", "Changelog", "FAQ"])

PAGES["faq_returns"] = lambda: divsoup("HomeGoods Direct", "Returns and refunds: frequently asked questions", [
    ("h1", "Returns and refunds"),
    ("h2", "How long do I have to return an item?"),
    ("p", "You can return most items within 30 days of delivery. Large furniture must be returned within 14 days and collected by our courier."),
    ("h2", "Who pays for return postage?"),
    ("p", "Returns are free if the item is faulty or we sent the wrong thing. Otherwise a return label costs 4.95, which we take from your refund."),
    ("h2", "When will I get my money back?"),
    ("p", "We refund you within five working days of receiving the item, to the card you paid with. Your bank may take a few more days to show it."),
    ("h2", "Can I exchange an item instead?"),
    ("p", "Yes. Choose exchange when you start the return and tell us the size or colour you want. We send the new item as soon as the old one is scanned by the courier."),
], sidebar_links=["Track my order", "Delivery options", "Gift cards", "Contact customer care"])

PAGES["science_coral"] = lambda: semantic("Science Today", "Coral larvae find reefs by listening", [
    ("h1", "Coral larvae find reefs by listening"),
    ("p", "Tiny coral larvae drifting in open water can hear the sounds of a healthy reef and swim towards them, a new study has found. The discovery could help scientists restore damaged reefs by playing recorded reef sounds."),
    ("p", "Researchers placed larvae in underwater chambers on a reef flat and played recordings from a thriving reef through loudspeakers on one side. Twice as many larvae settled near the speakers as in silent control chambers."),
    ("p", "The larvae seem to respond to the low crackle made by snapping shrimp and the grunts of fish, which carry for several kilometres underwater. Degraded reefs are much quieter, which may make it harder for new corals to find them."),
    ("p", "The team now plans a larger trial on a reef that was bleached three years ago."),
], byline="By Owen Thackeray · Marine biology", sidebar_links=MOST_READ,
    comment_items=[("ocean_fan", "yesterday", "Fascinating. I never knew reefs were noisy places."), ("skeptic42", "yesterday", "Twice as many out of how many? The article should give the numbers.")],
    rel=["Heatwave bleaches a third of the northern reef", "How divers are replanting coral by hand"])

PAGES["travel_ridge"] = lambda: divsoup("Wandering Boots", "Walking the Ridgeway in four days", [
    ("h1", "Walking the Ridgeway in four days"),
    ("p", "The Ridgeway is often called the oldest road in Britain. For at least five thousand years people have walked along this chalk escarpment, and today it is a national trail of about 140 kilometres."),
    ("p", "We walked it from west to east in late September, carrying light packs and staying in pubs and guest houses along the way. The first two days are the most remote, with long stretches of open downland and almost no shade."),
    ("h2", "Where we stayed"),
    ("ul", ["Night one: a farmhouse bed and breakfast near the Uffington White Horse", "Night two: the village inn at Streatley, by the river", "Night three: a youth hostel in the Chiltern woods"]),
    ("p", "Book ahead in summer. Accommodation near the trail is limited, and on the second day there is nothing at all for twenty kilometres."),
], sidebar_links=["Packing list for a long walk", "Our favourite waterproofs", "The best pubs on national trails"],
    comment_items=[("Hilary", "October 2, 2023", "Lovely write-up. We did it in five days with a dog and it was perfect.")])

PAGES["kb_printer"] = lambda: docs("Acme Support", "Printer shows offline in Windows", [
    ("h1", "Printer shows offline in Windows"),
    ("p", "If Windows shows your Acme printer as offline even though it is switched on, work through these steps in order. Most problems are fixed by the first three."),
    ("ol", ["Restart the printer and wait until the display shows Ready.",
            "Check that the printer and the computer are on the same Wi-Fi network.",
            "In Settings, open Printers and scanners, select the printer and choose Open print queue. Clear any stuck jobs.",
            "Turn off Use printer offline in the Printer menu of the queue window.",
            "Remove the printer and add it again."]),
    ("h2", "Still offline?"),
    ("p", "Print a network configuration page from the printer menu and compare its IP address with the one Windows uses. If they differ, give the printer a fixed address in your router settings."),
], ["Getting started", "Connecting to Wi-Fi", "Printer shows offline", "Paper jams", "Ink and toner", "Warranty"])

PAGES["opinion_four_day_week"] = lambda: semantic("The Evening Ledger", "The four-day week is not a perk, it is a productivity tool", [
    ("h1", "The four-day week is not a perk, it is a productivity tool"),
    ("p", "When my company moved to a four-day week last year, I expected the work to pile up. Instead, meetings shrank, email slowed down and most teams shipped more than they had the year before."),
    ("p", "The reason is not mysterious. With one day fewer, people stopped tolerating the meetings that could have been a message and the reports nobody read. The constraint forced choices that nobody had been willing to make."),
    ("quote", "A shorter week is a forcing function: it makes the unimportant visible."),
    ("p", "It does not suit every job. Shops, hospitals and schools cannot simply close on Fridays. But for office work, the burden of proof should now be on those who want to keep five days."),
], byline="Opinion · Dana Whitfield", sidebar_links=MOST_READ, comment_items=NEWS_COMMENTS[:2],
    rel=["Letters: the four-day week debate", "Trial results: what 60 companies learned"])

PAGES["event_meetup"] = lambda: semantic("Rust Meetup North", "Spring meetup: agenda and venue", [
    ("h1", "Spring meetup: agenda and venue"),
    ("p", "Our spring meetup is on Thursday 18 April at the Old Mill co-working space, five minutes from the station. Doors open at six; talks start at half past."),
    ("h2", "Agenda"),
    ("ul", ["18:30 Welcome and news from the community", "18:45 Writing a tiny database in a weekend, by Lena Fischer", "19:25 Break, with pizza and drinks", "19:50 Error handling without tears, by Marcus Hale", "20:30 Lightning talks"]),
    ("p", "The venue is step-free, and there is bike parking in the courtyard. Please register so that we can order enough food."),
], byline="Posted by the organisers", rel=["Call for talks: summer meetup", "Photos from the winter meetup"])

PAGES["mailing_list_patch"] = lambda: tables("lists.example.org", "Re: [PATCH v2] scheduler: avoid double wakeup", [
    ("h1", "Re: [PATCH v2] scheduler: avoid double wakeup"),
    ("p", "On Tue, Ivo Marek wrote: the second wakeup is harmless but costs about two percent on the pipe benchmark."),
    ("p", "I measured this on a 64-core machine and see the same gain. The change looks right to me, but the comment above try_wake should say why the flag is checked twice, or the next person will remove the check again."),
    ("p", "With that comment added, feel free to add my Reviewed-by tag."),
    ("pre", "Reviewed-by: Hanna Lindqvist"),
])

PAGES["short_notice"] = lambda: semantic("Oakridge Library", "Planned closure for maintenance", [
    ("h1", "Planned closure for maintenance"),
    ("p", "The main library building will be closed from Monday 6 May to Wednesday 8 May while the heating system is replaced. The book drop stays open, and loans due in those days are extended automatically."),
    ("p", "The Eastside branch keeps its usual hours and can hold reserved books for you during the closure."),
], byline="Library news", sidebar_links=["Opening hours", "Join the library", "Events for children", "E-books and audiobooks"])


# ---- pages written after ftx's boilerplate rules were chosen (its out-of-sample check) ------

HOLDOUT = {}


def gov_page():
    blocks = [
        ("h1", "Apply for a fishing licence"),
        ("p", "You need a rod fishing licence to fish for salmon, trout, freshwater fish, smelt or eel with a rod and line in England. You can buy a licence for 1 day, 8 days or 12 months."),
        ("h2", "Who needs a licence"),
        ("p", "Everyone aged 13 or over needs a licence. Licences for children aged 13 to 16 are free, but they still need to apply for one."),
        ("h2", "What you need to apply"),
        ("ul", ["your date of birth", "the number of your Blue Badge or National Insurance number if you are getting a discount", "a debit or credit card"]),
        ("p", "You will get your licence number straight away. Keep it with you when you fish, as a water bailiff can ask to see it."),
    ]
    body = f"""<a href="#main-content" class="govuk-skip-link">Skip to main content</a>
<div class="gem-c-cookie-banner"><p>We would like to use additional cookies to remember your settings and understand how you use the service.</p><a href="#">Accept additional cookies</a> <a href="#">Reject additional cookies</a></div>
<header class="govuk-header"><a href="/" class="govuk-header__link">GOV.SITE</a><a href="/menu">Menu</a></header>
<div class="govuk-width-container"><div class="govuk-phase-banner">BETA This is a new service. Your feedback will help us to improve it.</div>
<main class="govuk-main-wrapper" id="main-content">
<div class="gem-c-contents-list"><h2>Contents</h2><ol><li><a href="#who">Who needs a licence</a></li><li><a href="#what">What you need to apply</a></li></ol></div>
<div class="govuk-body">{blocks_html(blocks)}</div>
<div class="gem-c-related-navigation"><h2>Related content</h2><ul><li><a href="/close-season">Fishing close seasons</a></li><li><a href="/byelaws">Fishing byelaws</a></li></ul></div>
<div class="gem-c-feedback"><h2>Is this page useful?</h2><a href="#">Maybe</a> <a href="#">Yes this page is useful</a> <a href="#">No this page is not useful</a><p>Thank you for your feedback. Report a problem with this page.</p></div>
</main></div>
<div class="govuk-footer"><p>All content is available under the Open Government Licence v3.0, except where otherwise stated.</p><p>Crown copyright</p></div>"""
    return page("Apply for a fishing licence - GOV.SITE", body), blocks_gold(blocks)


def live_blog():
    entries = [
        ("14:52", "The last runners have crossed the line, just under seven hours after the start. Organisers say 31,204 people finished, a record for the race."),
        ("13:10", "Warm weather has kept the medical tents busy. Race officials urged runners to slow down and use the extra water stations added this morning."),
        ("11:47", "Amina Yusuf has won the women's race in 2 hours 21 minutes, breaking the course record by more than a minute in her first attempt at the distance."),
        ("11:02", "The men's race was decided in a sprint on the final straight, with Tomas Leng edging ahead of last year's winner by two seconds."),
    ]
    items = "".join(f'<div class="lb-entry"><time>{t}</time><p>{E(x)}</p><div class="lb-entry-actions"><a href="#">Copy link</a></div></div>' for t, x in entries)
    body = f"""<div class="masthead"><a href="/">The Daily Courier</a> <a href="/news">News</a> <a href="/sport">Sport</a> <a href="/login">Sign in</a></div>
<div class="paywall-notice"><p>You have read 3 of your 5 free articles this month. Register for free to keep reading.</p></div>
<div class="story"><h1>City marathon 2024: live updates</h1><div class="story-meta">Updated 14:52 · By the sport desk</div>
<div class="liveblog-feed">{items}</div></div>
<section class="most-popular"><h2>Most popular</h2><ol><li><a href="/1">Stadium plans approved despite objections</a></li><li><a href="/2">Where to watch the cup final this weekend</a></li><li><a href="/3">Ten runners to follow next season</a></li></ol></section>
<div class="site-info"><p>The Daily Courier is published by Courier Media Ltd. Registered in England.</p></div>"""
    gold = "City marathon 2024: live updates\n\n" + "\n\n".join(x for _, x in entries) + "\n"
    return page("City marathon 2024: live updates | The Daily Courier", body), gold


def repo_readme():
    blocks = [
        ("h1", "quickcsv"),
        ("p", "A small, fast CSV parser with no dependencies. It reads a file in a single pass and hands you each row as a slice of fields, without copying."),
        ("h2", "Usage"),
        ("pre", "let mut reader = quickcsv::Reader::from_path(\"data.csv\")?;\nwhile let Some(row) = reader.next_row()? {\n    println!(\"{}\", row[0]);\n}"),
        ("h2", "Performance"),
        ("p", "On a laptop it parses about 900 megabytes per second on the benchmark files in the bench folder, roughly twice the speed of a line-by-line parser."),
        ("h2", "License"),
        ("p", "Dual licensed under MIT or Apache 2.0, at your option."),
    ]
    files = "".join(f'<div role="row" class="Box-row"><a href="/tree/{f}">{f}</a><span class="commit-msg">update docs</span><span>2 months ago</span></div>' for f in ["src", "bench", "tests", "Cargo.toml", "README.md"])
    body = f"""<div class="Header"><a href="/">CodeHost</a> <a href="/pulls">Pull requests</a> <a href="/issues">Issues</a> <a href="/explore">Explore</a></div>
<div class="repohead"><strong>jdoe / quickcsv</strong> <span class="Counter">Star 1.2k</span> <span class="Counter">Fork 84</span><div class="UnderlineNav"><a href="#">Code</a> <a href="#">Issues 12</a> <a href="#">Pull requests 3</a> <a href="#">Actions</a></div></div>
<div class="Box"><div class="Box-header">jdoe Merge pull request #41 from fix/quotes · 3 weeks ago · 214 commits</div>{files}</div>
<div class="Box" id="readme"><div class="Box-header">README.md</div><article class="markdown-body">{blocks_html(blocks)}</article></div>
<div class="BorderGrid"><h2>About</h2><p>Fast CSV parsing for Rust</p><h2>Releases 9</h2><p>v0.9.2 Latest</p><h2>Languages</h2><p>Rust 98.1% Shell 1.9%</p></div>
<div class="site-footer">© 2024 CodeHost, Inc. Terms Privacy Security Status Docs Contact</div>"""
    return page("GitHub-like - jdoe/quickcsv: A small, fast CSV parser", body), blocks_gold(blocks)


def recipe_story():
    blocks = [
        ("h1", "Weeknight lentil soup"),
        ("p", "This soup started as a way to use up a bag of red lentils at the back of the cupboard, and it has been on our table every week since. It takes thirty minutes and most of that is simmering."),
        ("p", "The trick is to fry the spices in the oil before the lentils go in. It takes a minute and makes the soup taste as if it cooked for hours."),
        ("h2", "Ingredients"),
        ("ul", ["2 tablespoons olive oil", "1 onion, chopped", "2 teaspoons ground cumin", "250 g red lentils, rinsed", "1.2 litres vegetable stock", "juice of half a lemon"]),
        ("h2", "Instructions"),
        ("ol", ["Soften the onion in the oil for eight minutes.", "Stir in the cumin and cook for one minute.", "Add the lentils and stock and simmer for twenty minutes, until the lentils fall apart.", "Blend half of the soup, stir it back in and season with the lemon juice and salt."]),
    ]
    body = f"""<div class="site-header"><a href="/">Everyday Pot</a> <a href="/recipes">Recipes</a> <a href="/about">About</a> <a href="/shop">Shop</a></div>
<div class="jump-bar"><a href="#recipe">Jump to Recipe</a> <a href="#" onclick="print()">Print Recipe</a></div>
<div class="post-body">{blocks_html(blocks[:3])}
<div class="adthrive-ad adthrive-content"><span>ADVERTISEMENT</span></div>
<div class="wprm-recipe-container" id="recipe"><div class="wprm-recipe-rating">4.9 from 212 votes</div>{blocks_html(blocks[3:])}
<div class="wprm-recipe-notes-container"><p>Did you make this recipe? Tag us on Instagram and rate it below!</p></div></div></div>
<div class="disclosure">This post may contain affiliate links. As an Amazon Associate I earn from qualifying purchases.</div>
<div class="site-footer-bottom">Copyright 2024 Everyday Pot · Privacy Policy · Accessibility</div>"""
    return page("Weeknight lentil soup - Everyday Pot", body), blocks_gold(blocks)


HOLDOUT["holdout_gov_service"] = gov_page
HOLDOUT["holdout_live_blog"] = live_blog
HOLDOUT["holdout_repo_readme"] = repo_readme
HOLDOUT["holdout_recipe_card"] = recipe_story


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out, exist_ok=True)
    for name, make in list(PAGES.items()) + list(HOLDOUT.items()):
        page_html, gold = make()
        with open(os.path.join(out, name + ".html"), "w") as f:
            f.write(page_html)
        with open(os.path.join(out, name + ".gold.txt"), "w") as f:
            f.write(gold)
    print(f"{len(PAGES) + len(HOLDOUT)} pages written to {out}")


if __name__ == "__main__":
    main()
